"""Routes compiled into lookup tables when the config loads, so a decision costs the same with 10 routes
of one item each as with a 10,000-CIDR country list and a 100,000-name block list.

Each condition field gets a table that answers, for a flow's value, the set of routes whose condition on
that field holds (routes without a condition on the field always do). Sets are bitmasks over the routes'
positions, so the routes every field lets through are one AND away, and the lowest set bit is the first
route in config order that matches: first-match-wins, exactly as the linear walk in gate.router
(``decide_linear``), which the property test in tests/gate/test_router_index.py compares against.
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from gate.validate import IPNetwork

if TYPE_CHECKING:
    from gate.route_spec import Match

__all__ = ["Address", "Intervals", "Names", "RouteIndex", "address", "host_name"]

Mask = int  # bit i set: the route at position i passes
Address = tuple[int, int]  # (IP version, the address as an integer)

_V4_MAPPED = bytes(10) + b"\xff\xff"


def address(text: str | None) -> Address | None:
    """``text`` as (version, integer) when it is an IP address, IPv4-mapped IPv6 as IPv4; else None.

    inet_pton (a third of ipaddress's cost; names leave without an exception); what it refuses goes to
    ipaddress when it could still be an address to it (a scoped ``fe80::1%eth0``), so both agree with
    gate.router's reading."""
    if text is None:
        return None
    if ":" in text:
        try:
            raw = socket.inet_pton(socket.AF_INET6, text)
        except (OSError, ValueError):  # ValueError: an embedded NUL
            pass
        else:
            if raw[:12] == _V4_MAPPED:
                return 4, int.from_bytes(raw[12:], "big")
            return 6, int.from_bytes(raw, "big")
    elif text.strip("0123456789."):
        return None  # a name (the common case, so no exception): IPv4 has no other character, IPv6 a colon
    else:
        try:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        except (OSError, ValueError):
            pass
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return 4, int(ip.ipv4_mapped)
    return ip.version, int(ip)


def host_name(host: str | None, dst_host: str | None, dst_is_address: bool) -> str:
    """The name a ``host`` condition looks at: the requested or sniffed name, else a named destination."""
    return (host or (None if dst_is_address else dst_host) or "").lower().rstrip(".")


class Intervals:
    """Integers (addresses of one family, or ports) to the mask of routes whose ranges cover them.

    Built by a sweep over the ranges' ends: the number line cut where any route's coverage changes,
    each piece with its mask; a lookup is one bisect. Pieces <= 2 x the ranges given."""

    __slots__ = ("_masks", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int, int]]) -> None:
        """``ranges``: (first, last, route position), inclusive, in any order, overlaps allowed."""
        by_route: dict[int, list[tuple[int, int]]] = {}
        for lo, hi, pos in ranges:
            by_route.setdefault(pos, []).append((lo, hi))
        # per route: merged into disjoint, non-adjacent ranges, so its bit toggles at each end exactly once
        events: list[tuple[int, int]] = []
        for pos, items in by_route.items():
            items.sort()
            bit = 1 << pos
            cur_lo, cur_hi = items[0]
            for lo, hi in items[1:]:
                if lo <= cur_hi + 1:
                    cur_hi = max(cur_hi, hi)
                else:
                    events += ((cur_lo, bit), (cur_hi + 1, bit))
                    cur_lo, cur_hi = lo, hi
            events += ((cur_lo, bit), (cur_hi + 1, bit))
        events.sort()
        starts: list[int] = []
        masks: list[Mask] = []
        mask = 0
        i = 0
        while i < len(events):
            at = events[i][0]
            while i < len(events) and events[i][0] == at:
                mask ^= events[i][1]
                i += 1
            if masks and masks[-1] == mask:
                continue  # a route ended where another began with the same set: one piece
            starts.append(at)
            masks.append(mask)
        self._starts = starts
        self._masks = masks

    def __len__(self) -> int:
        return len(self._starts)

    def lookup(self, value: int) -> Mask:
        i = bisect_right(self._starts, value) - 1
        return self._masks[i] if i >= 0 else 0


class Names:
    """Host names to the mask of routes with a pattern that matches: exact ``example.com``, ``*.x``
    (any name ending in ``.x``) and ``.x`` (``x`` itself or any name ending in ``.x``).

    Two dicts keyed by whole names and by suffixes; a lookup tries the name and then each suffix that
    follows one of its dots, so it costs one dict probe per label, whatever the list's size. String
    suffixes after a dot are what gate.router's ``str.endswith`` tests, so the two agree on odd names
    (empty labels) too."""

    __slots__ = ("_exact", "_longest", "_suffix")

    def __init__(self, patterns: Iterable[tuple[str, int]]) -> None:
        """``patterns``: (pattern, route position), patterns already lower case and validated."""
        self._exact: dict[str, Mask] = {}
        self._suffix: dict[str, Mask] = {}
        for pattern, pos in patterns:
            bit = 1 << pos
            if pattern.startswith("*."):
                key = pattern[2:]
                self._suffix[key] = self._suffix.get(key, 0) | bit
            elif pattern.startswith("."):
                key = pattern[1:]
                self._suffix[key] = self._suffix.get(key, 0) | bit
                self._exact[key] = self._exact.get(key, 0) | bit
            else:
                self._exact[pattern] = self._exact.get(pattern, 0) | bit
        self._longest = max(map(len, self._suffix), default=0)

    def lookup(self, name: str) -> Mask:
        mask = self._exact.get(name, 0)
        if self._suffix:
            suffix = self._suffix
            # only suffixes as long as the longest pattern's can match: a peer's 16 KiB Host of dots
            # costs as many probes as a real name, not one per dot
            dot = name.find(".", max(len(name) - self._longest - 1, 0))
            while dot >= 0:
                mask |= suffix.get(name[dot + 1:], 0)
                dot = name.find(".", dot + 1)
        return mask


def _unconditioned(values: Sequence[tuple[object, ...]]) -> Mask:
    """The routes with no item in this field (an empty tuple: "any")."""
    return sum(1 << pos for pos, items in enumerate(values) if not items)


def _words(values: Sequence[tuple[str, ...]]) -> dict[str, Mask]:
    table: dict[str, Mask] = {}
    for pos, items in enumerate(values):
        for item in items:
            table[str(item)] = table.get(str(item), 0) | 1 << pos
    return table


def _networks(values: Sequence[tuple[IPNetwork, ...]]) -> dict[int, Intervals]:
    ranges: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
    for pos, nets in enumerate(values):
        for net in nets:
            first = int(net.network_address)  # (num_addresses costs 10x the shift)
            ranges[net.version].append((first, first + (1 << net.max_prefixlen - net.prefixlen) - 1, pos))
    return {version: Intervals(items) for version, items in ranges.items()}


class RouteIndex:
    """The tables of one ordered list of matches; ``candidates`` is every route whose conditions hold."""

    def __init__(self, matches: Sequence[Match]) -> None:
        self.size = len(matches)
        self.everything: Mask = (1 << len(matches)) - 1
        fields = {name: [getattr(m, name) for m in matches]
                  for name in ("listener", "src", "dst", "port", "host", "protocol", "sni", "alpn")}
        # per field: the routes without a condition on it (all of them: the field is skipped)
        anyf = {name: _unconditioned(values) for name, values in fields.items()}
        self._any_listener, self._any_src, self._any_dst, self._any_port = (
            anyf["listener"], anyf["src"], anyf["dst"], anyf["port"])
        self._any_host, self._any_protocol, self._any_sni, self._any_alpn = (
            anyf["host"], anyf["protocol"], anyf["sni"], anyf["alpn"])
        self._sniffed = any(anyf[name] != self.everything for name in ("protocol", "sni", "alpn"))
        self._listener = _words(fields["listener"])
        self._protocol = _words(fields["protocol"])
        self._alpn = _words(fields["alpn"])
        self._src = _networks(fields["src"])
        self._dst = _networks(fields["dst"])
        self._port = Intervals((lo, hi, pos) for pos, ranges in enumerate(fields["port"]) for lo, hi in ranges)
        self._host = Names((p, pos) for pos, patterns in enumerate(fields["host"]) for p in patterns)
        self._sni = Names((p, pos) for pos, patterns in enumerate(fields["sni"]) for p in patterns)

    def candidates(self, listener: str, src: str | None, dst_host: str | None, port: int | None, host: str | None,
                   protocol: str | None = None, sni: str | None = None, alpn: tuple[str, ...] = (), *,
                   sniffed: bool = True, names: bool = True) -> Mask:
        """The routes whose every condition holds. Without ``sniffed`` protocol, SNI and ALPN count as
        holding, without ``names`` so does ``host`` (what gate.router.needs_sniff asks: which routes
        could still match once sniffing fills those in). Spelled out field by field: this runs per flow."""
        everything = self.everything
        mask = everything
        if self._any_listener != everything:
            mask &= self._any_listener | self._listener.get(listener, 0)
        if self._any_port != everything:
            mask &= self._any_port | (self._port.lookup(port) if port is not None else 0)
        if self._any_src != everything and mask:
            ip = address(src)
            mask &= self._any_src | (self._src[ip[0]].lookup(ip[1]) if ip else 0)
        dst = address(dst_host)
        if self._any_dst != everything and mask:
            mask &= self._any_dst | (self._dst[dst[0]].lookup(dst[1]) if dst else 0)
        if names and self._any_host != everything and mask:
            name = host_name(host, dst_host, dst is not None)
            mask &= self._any_host | (self._host.lookup(name) if name else 0)
        if sniffed and self._sniffed and mask:
            if self._any_protocol != everything:
                mask &= self._any_protocol | (self._protocol.get(protocol, 0) if protocol is not None else 0)
            if self._any_sni != everything:
                mask &= self._any_sni | (self._sni.lookup(sni) if sni else 0)
            if self._any_alpn != everything:
                offered = self._any_alpn
                for item in alpn:
                    offered |= self._alpn.get(item, 0)
                mask &= offered
        return mask
