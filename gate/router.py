"""Route decisions: the first route whose match holds wins; ``explain`` says why for each route.

``Router`` decides through the routes compiled into gate.route_index (a lookup per field, not a walk over
every route's every item); ``decide_linear`` and ``why_not`` are the plain reading of the same rules,
which ``explain`` and the mesh's allow lists use and the property test holds the index to."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from gate.addr import Endpoint
from gate.config import Match, Route
from gate.route_index import RouteIndex
from gate.validate import IPNetwork
from gate.vocab import Action

__all__ = ["Decision", "FlowKey", "Router", "bypass_routes", "decide_linear", "may_meet", "needs_sniff_linear",
           "why_not"]

SHOWN = 8  # items of a condition ``explain`` quotes; a list from a file has thousands


@dataclass(frozen=True, slots=True)
class FlowKey:
    """What routing may look at: a pure view of a Flow (also built by ``ugate route``)."""

    listener: str
    src: str | None
    dst_host: str | None
    port: int | None
    host: str | None  # requested name, else the sniffed SNI / HTTP Host
    protocol: str | None = None  # sniffed: tls, http, h2c, ssh, socks, unknown (None: not sniffed)
    sni: str | None = None
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    route: Route | None  # None: no route matched (then the action is reject)
    upstream: Endpoint | None = None

    @property
    def rule(self) -> str:
        return self.route.name if self.route else "no-match"

    @property
    def via(self) -> str | None:
        return self.route.via if self.route else None

    @property
    def preserve_source(self) -> bool:
        return self.route is not None and self.route.preserve_source


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if text is None:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def _host_matches(pattern: str, name: str) -> bool:
    """Exact; "*.example.com": any subdomain; ".example.com": the domain and any subdomain."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    if pattern.startswith("."):
        return name.endswith(pattern) or name == pattern[1:]
    return name == pattern


def _listed(items: list[str], files: tuple[str, ...] = ()) -> str:
    """A condition's items for ``explain``: all of a short inline list, the first few of a long one."""
    if len(items) <= SHOWN and not files:
        return str(items)
    more = ["..."] if len(items) > SHOWN else []
    origin = f", with {', '.join(files)}" if files else ""
    return f"{items[:SHOWN] + more} ({len(items):,} in all{origin})"


def _listed_why(match: Match, key: FlowKey) -> str:
    """For a route with list files: which entry the flow matched (a reader cannot find it by eye)."""
    if not (match.dst_from or match.host_from):
        return ""
    found = []
    dst = _ip(key.dst_host)
    if match.dst and dst is not None:
        net = next(n for n in match.dst if dst in n)
        found.append(f"dst {key.dst_host} in {net}")
    if match.host:
        name = (key.host or (key.dst_host if dst is None else None) or "").lower().rstrip(".")
        found.append(f"host {name!r} matches {next(p for p in match.host if _host_matches(p, name))!r}")
    return f" ({', '.join(found)})"


def why_not(match: Match, key: FlowKey) -> str | None:
    """None if ``match`` holds for ``key``; else the first failed condition, in words."""
    if match.listener and key.listener not in match.listener:
        return f"listener {key.listener!r} not in {list(match.listener)}"
    if match.src:
        src = _ip(key.src)
        if src is None or not any(src in net for net in match.src):
            return f"src {key.src} not in {_listed([str(n) for n in match.src])}"
    if match.dst:
        dst = _ip(key.dst_host)
        if dst is None or not any(dst in net for net in match.dst):
            what = "is a name, not an address" if dst is None and key.dst_host else "not in"
            return f"dst {key.dst_host} {what} {_listed([str(n) for n in match.dst], match.dst_from)}"
    if match.port and (key.port is None or not any(lo <= key.port <= hi for lo, hi in match.port)):
        return f"port {key.port} not in {_listed([f'{lo}-{hi}' if lo != hi else str(lo) for lo, hi in match.port])}"
    if match.host:
        name = (key.host or (key.dst_host if _ip(key.dst_host) is None else None) or "").lower().rstrip(".")
        if not name or not any(_host_matches(p, name) for p in match.host):
            return f"host {name or '(none)'!r} does not match {_listed(list(match.host), match.host_from)}"
    if match.protocol and key.protocol not in match.protocol:
        return f"protocol {key.protocol or '(not sniffed)'} not in {list(match.protocol)}"
    if match.sni and not (key.sni and any(_host_matches(p, key.sni) for p in match.sni)):
        return f"sni {key.sni or '(none)'!r} does not match {_listed(list(match.sni))}"
    if match.alpn and not set(match.alpn) & set(key.alpn):
        return f"alpn {list(key.alpn)} has none of {list(match.alpn)}"
    return None


def _decision(route: Route, key: FlowKey) -> Decision:
    if route.action == "resolve":
        # the name the client asked for (or sent as SNI / Host), on the port it connected to; decided
        # here so every listener simply dials the decision's upstream. Without a name: the original.
        name = key.host
        return Decision(Action.RESOLVE, route, Endpoint(name, key.port) if name and key.port else None)
    return Decision(route.action, route, route.upstream)


def _spans(nets: tuple[IPNetwork, ...], version: int) -> list[tuple[int, int]]:
    return sorted((first := int(n.network_address), first + (1 << n.max_prefixlen - n.prefixlen) - 1)
                  for n in nets if n.version == version)


def _nets_meet(a: tuple[IPNetwork, ...], b: tuple[IPNetwork, ...]) -> bool:
    """Whether some address is in both lists (either empty: "any"); sorted sweeps, since a list from a
    file against another would be 10^8 pairs."""
    if not a or not b:
        return True
    for version in (4, 6):
        xs, ys = _spans(a, version), _spans(b, version)
        i = j = 0
        while i < len(xs) and j < len(ys):
            if xs[i][0] <= ys[j][1] and ys[j][0] <= xs[i][1]:
                return True
            if xs[i][1] < ys[j][1]:
                i += 1
            else:
                j += 1
    return False


def may_meet(a: Match, b: Match) -> bool:
    """Whether some flow could match both on addresses and ports (other conditions count as "could")."""
    ports = not a.port or not b.port or any(lo <= hi2 and lo2 <= hi for lo, hi in a.port for lo2, hi2 in b.port)
    return ports and _nets_meet(a.dst, b.dst) and _nets_meet(a.src, b.src)


def _address_only(match: Match) -> bool:
    """Decides on what the first packet's headers hold: no listener, name or sniffed condition."""
    return not (match.listener or match.host or match.protocol or match.sni or match.alpn)


def bypass_routes(routes: tuple[Route, ...]) -> tuple[Route, ...]:
    """The routes the capture rules may compile to "do not capture": address-only, offloadable (direct
    with the client's source, offload not off), and first-match exact: no earlier route that is not
    compiled itself could match any flow this one matches (it might decide differently). An earlier
    route with a name or sniffed condition counts as matching wherever its addresses overlap."""
    compiled: list[Route] = []
    kept: list[Route] = []  # earlier routes left to user space
    for route in routes:
        if route.offloadable and _address_only(route.match) and not any(may_meet(k.match, route.match)
                                                                         for k in kept):
            compiled.append(route)
        else:
            kept.append(route)
    return tuple(compiled)


_NO_MATCH = Decision(Action.REJECT, None)


def decide_linear(routes: tuple[Route, ...], key: FlowKey) -> Decision:
    """The plain reading of first-match-wins: each route in order, each condition item by item. The
    reference ``Router.decide`` is held to (tests); ``explain`` walks the same way."""
    for route in routes:
        if why_not(route.match, key) is None:
            return _decision(route, key)
    return Decision(Action.REJECT, None)


def _name_known(key: FlowKey) -> bool:
    return key.host is not None or (key.dst_host is not None and _ip(key.dst_host) is None)


def _looks_at_sniffed(route: Route, name_known: bool) -> bool:
    m = route.match
    return bool(m.protocol or m.sni or m.alpn or ((m.host or route.action == "resolve") and not name_known))


def needs_sniff_linear(routes: tuple[Route, ...], key: FlowKey) -> bool:
    """``Router.needs_sniff`` read plainly (the reference for tests)."""
    name_known = _name_known(key)
    for route in routes:
        unsniffed = replace(route.match, protocol=(), sni=(), alpn=())
        if why_not(unsniffed if name_known else replace(unsniffed, host=()), key) is not None:
            continue  # fails on what is known already, whatever sniffing finds
        return _looks_at_sniffed(route, name_known)
    return False


class Router:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        self.bypass = bypass_routes(routes)
        self._index = RouteIndex([route.match for route in routes])
        # a route's decision is the same for every flow but with action resolve (the flow's name): made once
        self._decisions = [None if route.action == "resolve" else _decision(route, FlowKey("", None, None, None, None))
                           for route in routes]

    def needs_sniff(self, key: FlowKey) -> bool:
        """Whether what sniffing finds (protocol, SNI, ALPN, or a host where only an address is known)
        could change the decision for ``key``: False when the first route that can match at all
        does not look at any of it, so a proxy can answer its client before the first byte."""
        name_known = _name_known(key)
        mask = self._index.candidates(key.listener, key.src, key.dst_host, key.port, key.host, sniffed=False,
                                      names=name_known)
        if not mask:
            return False
        return _looks_at_sniffed(self.routes[(mask & -mask).bit_length() - 1], name_known)

    def decide(self, key: FlowKey) -> Decision:
        """The first route whose match holds: the lowest route the index lets through on every field
        (the index is exact per field, so no candidate needs checking again item by item)."""
        mask = self._index.candidates(key.listener, key.src, key.dst_host, key.port, key.host, key.protocol,
                                      key.sni, key.alpn)
        if not mask:
            return _NO_MATCH
        first = (mask & -mask).bit_length() - 1
        return self._decisions[first] or _decision(self.routes[first], key)

    def explain(self, key: FlowKey, bypass: bool = False, fastpath: bool = False) -> list[str]:
        """One line per route tried, ending with the decision; with ``bypass`` (the capture rules hold
        the compiled routes, and the flow arrives through capture) or ``fastpath`` (a tproxy_udp flow,
        and the rules have the fast path sets), says when the kernel forwards it."""
        lines = []
        for route in self.routes:
            reason = why_not(route.match, key)
            if reason is None:
                upstream = _decision(route, key).upstream
                target = f" -> {upstream}" if upstream else f" {route.via}" if route.via else ""
                if route.action == "resolve" and upstream is None:
                    target = " (no name known: the original destination)"
                why = _listed_why(route.match, key)
                lines.append(f"routes[{route.index}] {route.name}: MATCH: {route.action}{target}{why}")
                if bypass and route in self.bypass:
                    lines.append("bypassed: the capture rules do not capture this flow (address-only route, "
                                 "direct with the client's source); the kernel forwards it and the gate never "
                                 "sees or logs it")
                elif fastpath and route.offloadable:
                    lines.append("kernel fast path: once routed, the session's later datagrams are forwarded by "
                                 "the kernel; one record when it ends (path kernel)")
                return lines
            lines.append(f"routes[{route.index}] {route.name}: no: {reason}")
        lines.append("no route matched: reject")
        return lines
