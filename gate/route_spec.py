"""Routes: the ``match`` conditions and the action of each ``routes[]`` item, parsed and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from gate.addr import Endpoint, parse_endpoint
from gate.intercept import Interceptor, load
from gate.validate import IPNetwork, Problems, boolean, hosts, names, networks, one_of, ports, string
from gate.vocab import PROTOCOLS, Action, Proto, ProxyProtocol

__all__ = ["OFFLOADS", "Match", "Offload", "Route", "check_offload", "parse_match", "parse_route"]

Offload = Literal["kernel", "off"]
OFFLOADS: tuple[Offload, ...] = ("kernel", "off")


@dataclass(frozen=True)
class Match:
    """Conditions of a route; an empty tuple means "any". Within a field any item may match."""

    listener: tuple[str, ...] = ()
    dst: tuple[IPNetwork, ...] = ()
    port: tuple[tuple[int, int], ...] = ()
    src: tuple[IPNetwork, ...] = ()
    # lower-case; "*.suffix" matches the suffix's subdomains, ".suffix" the suffix itself and its subdomains
    host: tuple[str, ...] = ()
    protocol: tuple[Proto, ...] = ()  # sniffed protocol
    sni: tuple[str, ...] = ()  # TLS server name, exact, "*.suffix" or ".suffix"
    alpn: tuple[str, ...] = ()  # any of these offered by the TLS client


@dataclass(frozen=True)
class Route:
    index: int
    name: str
    match: Match
    action: Action
    upstream: Endpoint | None = None
    preserve_source: bool = False
    proxy_protocol: ProxyProtocol | None = None  # tell the upstream who the client is, first thing
    via: str | None = None  # action "via": the peer gate whose tunnel carries the flow
    # "kernel": hand the route's flows to the kernel where semantics allow (address-only bypass, UDP fast
    # path); "off": never; None (not given): the same as "kernel" (see gate.router.bypass_routes)
    offload: Offload | None = None
    # the function ``intercept: module:function`` names (gate.intercept): sees and may change each chunk
    intercept: Interceptor | None = None

    @property
    def offloadable(self) -> bool:
        """Whether the kernel may forward this route's flows: it dials the original destination
        (``direct``) from the client's own address, so the server sees the same either way."""
        return self.action == Action.DIRECT and self.preserve_source and self.offload != "off"




def _protocols(value: Any) -> tuple[Proto, ...]:
    found = names(value)
    for name in found:
        if name not in PROTOCOLS:
            raise ValueError(f"{name!r} is not one of: {', '.join(PROTOCOLS)}")
    return cast(tuple[Proto, ...], found)


_MATCH_KEYS = ("listener", "dst", "port", "src", "host", "protocol", "sni", "alpn")
_ROUTE_KEYS = ("name", "match", "action", "upstream", "preserve_source", "proxy_protocol", "via", "offload",
               "intercept")


def parse_route(raw: Any, index: int, listeners: set[str], peers: set[str], p: Problems) -> Route | None:
    where = f"routes[{index}]"
    if not isinstance(raw, Mapping):
        p.add(where, "expected a mapping with match and an action")
        return None
    m = p.mapping(raw, where, _ROUTE_KEYS)
    match = parse_match(m.get("match"), f"{where}.match", listeners, p)
    upstream = p.get(m, "upstream", where, parse_endpoint, None)
    via = p.get(m, "via", where, string, None)
    implied = Action.UPSTREAM if "upstream" in m else Action.VIA if "via" in m else None
    action = p.get(m, "action", where, one_of(Action), implied)
    if action is None:
        if "action" not in m:
            p.add(where, "needs an action (direct, resolve, reject), upstream: host:port, or via: PEER")
    elif action == Action.UPSTREAM and "upstream" not in m:
        p.add(f"{where}.upstream", "missing (action upstream needs upstream: host:port)")
    elif action != Action.UPSTREAM and "upstream" in m:
        p.add(f"{where}.upstream", f"not allowed with action {action}")
    elif action == Action.VIA and via is None:
        p.add(f"{where}.via", "missing (action via needs via: PEER)")
    elif action != Action.VIA and "via" in m:
        p.add(f"{where}.via", f"not allowed with action {action}")
    offload = p.get(m, "offload", where, _offload, None)
    if offload == "kernel" and not (action == Action.DIRECT and p.get(m, "preserve_source", where, boolean, False)):
        p.add(f"{where}.offload", "kernel needs action direct and preserve_source: true (only then does the "
              "server see the same whether the gate or the kernel forwards)")
    intercept = p.get(m, "intercept", where, _interceptor, None)
    if intercept is not None and action in (Action.REJECT, Action.VIA):
        p.add(f"{where}.intercept", f"not with action {action}: it needs the flow's bytes relayed here")
    if via is not None and via not in peers:
        p.add(f"{where}.via", f"no peer is named {via!r}" + ("" if peers else " (peers: is empty)"))
    return Route(index=index, name=p.get(m, "name", where, string, f"#{index}"), match=match,
                 action=action or Action.REJECT, upstream=upstream,
                 preserve_source=p.get(m, "preserve_source", where, boolean, False),
                 proxy_protocol=p.get(m, "proxy_protocol", where, one_of(ProxyProtocol), None), via=via,
                 offload=offload, intercept=intercept)


def _interceptor(value: Any) -> Interceptor:
    if not isinstance(value, str):
        raise ValueError("expected module:function")
    return load(value)


def _offload(value: Any) -> Offload:
    if value not in OFFLOADS:
        raise ValueError(f"{value!r} is not one of: {', '.join(OFFLOADS)}")
    return cast(Offload, value)


def parse_match(raw: Any, where: str, listeners: set[str], p: Problems) -> Match:
    mm = p.mapping(raw, where, _MATCH_KEYS)
    w = where
    match = Match(
        listener=p.get(mm, "listener", w, names, ()),
        dst=p.get(mm, "dst", w, networks, ()),
        port=p.get(mm, "port", w, ports, ()),
        src=p.get(mm, "src", w, networks, ()),
        host=p.get(mm, "host", w, hosts, ()),
        protocol=p.get(mm, "protocol", w, _protocols, ()),
        sni=p.get(mm, "sni", w, hosts, ()),
        alpn=p.get(mm, "alpn", w, names, ()),
    )
    for name in match.listener:
        if name not in listeners:
            p.add(f"{w}.listener", f"no listener is named {name!r}")
    return match


def check_offload(routes: list[Route], capture: tuple[str, str] | None, p: Problems) -> None:
    """``offload: kernel`` asked for where it cannot be had: it needs capture in mode tproxy with the
    nftables backend (``capture`` is (mode, backend)): the fast path's sets and the bypass rules exist
    only there (iptables would need ipset; not built)."""
    for route in routes:
        if route.offload != "kernel":
            continue
        if capture is None or capture[1] != "nftables":
            what = "no capture section" if capture is None else f"capture.backend {capture[1]}"
            p.add(f"routes[{route.index}].offload", f"kernel is nftables-only ({what}); use offload: off or "
                  "capture.backend: nftables")
        elif capture[0] != "tproxy":
            p.add(f"routes[{route.index}].offload", f"kernel needs capture.mode tproxy (not {capture[0]})")

