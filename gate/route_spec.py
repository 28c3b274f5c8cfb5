"""Routes: the ``match`` conditions and the action of each ``routes[]`` item, parsed and validated."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from gate.addr import Endpoint, parse_endpoint
from gate.intercept import Interceptor, load
from gate.route_lists import ListProblems, read_list, resolve
from gate.validate import (
    IPNetwork,
    Problems,
    boolean,
    host_pattern,
    hosts,
    names,
    network,
    networks,
    one_of,
    ports,
    string,
)
from gate.vocab import PROTOCOLS, Action, Proto, ProxyProtocol

__all__ = ["OFFLOADS", "Match", "Offload", "Route", "check_offload", "parse_match", "parse_route"]

T = TypeVar("T")
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
    # the list files (as the config names them) whose entries ``dst`` / ``host`` include, for ``explain``
    dst_from: tuple[str, ...] = ()
    host_from: tuple[str, ...] = ()


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


_MATCH_KEYS = ("listener", "dst", "dst_from", "port", "src", "host", "host_from", "protocol", "sni", "alpn")
_ROUTE_KEYS = ("name", "match", "action", "upstream", "preserve_source", "proxy_protocol", "via", "offload",
               "intercept")


def parse_route(raw: Any, index: int, listeners: set[str], peers: set[str], p: Problems,
                base: Path | None = None) -> Route | None:
    """One ``routes[]`` item; list files (``dst_from``, ``host_from``) are relative to ``base`` (the
    config file's directory)."""
    where = f"routes[{index}]"
    if not isinstance(raw, Mapping):
        p.add(where, "expected a mapping with match and an action")
        return None
    m = p.mapping(raw, where, _ROUTE_KEYS)
    match = parse_match(m.get("match"), f"{where}.match", listeners, p, base)
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


def _from_files(mm: Mapping[str, Any], key: str, where: str, entry: Callable[[str], T], base: Path | None,
                p: Problems) -> tuple[tuple[str, ...], tuple[T, ...]]:
    """(the files as named, their entries) of ``key``: a file or a list of files."""
    none: tuple[str, ...] = ()
    files = p.get(mm, key, where, names, none)
    found: list[T] = []
    failed = False
    for name in files:
        try:
            found += read_list(resolve(name, base), entry, name)
        except ListProblems as e:
            failed = True
            for problem in e.problems:
                p.add(f"{where}.{key}", problem)
    if files and not found and not failed and not mm.get(key.removesuffix("_from")):
        # an empty condition means "any": an empty block list would otherwise block everything
        p.add(f"{where}.{key}", f"{', '.join(files)}: no entries (the route would match every "
              f"{'destination' if key == 'dst_from' else 'name'})")
    return files, tuple(found)


def _listed_host(line: str) -> str:
    """A host pattern on a list file's line: one word (a hosts-file line, ``0.0.0.0 ads.test``, is not one)."""
    if len(line.split()) != 1:
        raise ValueError(f"{line!r} is not a host name, *.suffix or .suffix (one per line)")
    return host_pattern(line)


def parse_match(raw: Any, where: str, listeners: set[str], p: Problems, base: Path | None = None) -> Match:
    mm = p.mapping(raw, where, _MATCH_KEYS)
    w = where
    dst_from, dst_listed = _from_files(mm, "dst_from", w, network, base, p)
    host_from, host_listed = _from_files(mm, "host_from", w, _listed_host, base, p)
    no_nets: tuple[IPNetwork, ...] = ()
    no_names: tuple[str, ...] = ()
    match = Match(
        listener=p.get(mm, "listener", w, names, ()),
        dst=p.get(mm, "dst", w, networks, no_nets) + dst_listed,
        dst_from=dst_from,
        port=p.get(mm, "port", w, ports, ()),
        src=p.get(mm, "src", w, networks, ()),
        host=p.get(mm, "host", w, hosts, no_names) + host_listed,
        host_from=host_from,
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

