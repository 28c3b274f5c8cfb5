"""The kernel fast path and the address-only bypass as nftables data, and the set elements at run time.

Fast path: a UDP session the gate has nothing left to do for (routed ``direct``, source preserved) gets
its two 5-tuples (client -> server, server -> client) put into sets the capture chain skips, so the
kernel forwards its later packets. Two sets per family, because one set cannot do both jobs exactly:
- ``fpN`` (liveness): ``flags timeout`` with the listener's session_timeout as the set's timeout; the
  skip rule's ``update`` refreshes an element on every packet, so it expires as an idle session does.
- ``fpcN`` (counts): ``counter`` on every element, no timeout. A lookup counts a packet once, but the
  ``update`` statement evaluates an element's counter a second time (measured on Linux 6.18: 10 packets
  counted 20), so counting in the liveness set would double every figure.
The skip rule matches only when both sets hold the tuple; the gate removes the count elements itself
once it read them for the log. Only the nftables backend has this (iptables: see gate.route_spec).

Bypass: routes that decide on addresses alone, compiled to ``return`` statements before the steering
ones (see gate.router.bypass_routes for which routes qualify). A route's addresses of one family go
inline (an anonymous set) up to SET_ABOVE of them; a longer list (a country's blocks from ``dst_from``)
becomes a named interval set declared in the table, one lookup in the kernel however long it is.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Bypass", "Counts", "FastpathNft", "Tuple5", "bypass_sets", "bypass_statements", "canonical",
           "element_script",
           "fastpath_sets", "fastpath_skip", "parse_counts", "parse_counts_text", "parse_live", "payload_bytes"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Elements per set: one per direction of an offloaded session, so at most 32,768 sessions per family are
# in the kernel at once. An offloaded session has left its listener's table (and its max_flows), so this
# is what bounds them, and the gate's record of each (a Flow); an add beyond it fails and that session
# stays in user space, under the listener's own limits.
MAX_ELEMENTS = 65536
# Addresses of one family a bypass statement holds inline; more go into a named set (an inline list of
# thousands makes one rule line of hundreds of KiB in ``nft list``, and nft checks it element by element)
SET_ABOVE = 16
SET_ELEMENTS_PER_LINE = 8  # as ``rules show`` prints a named set's elements
HEADER = {4: 28, 6: 48}  # IP + UDP header bytes the element counters include and flow byte counts do not


@dataclass(frozen=True)
class Bypass:
    """A route compiled to "do not capture": its address conditions (empty: any)."""

    name: str
    dst: tuple[IPNetwork, ...] = ()
    src: tuple[IPNetwork, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Tuple5:
    """One direction of a UDP session, as the sets key it."""

    src: str
    sport: int
    dst: str
    dport: int

    @property
    def version(self) -> int:
        return 6 if ":" in self.src else 4

    def nft(self) -> str:
        return f"{self.src} . {self.sport} . {self.dst} . {self.dport}"

    def reverse(self) -> Tuple5:
        return Tuple5(self.dst, self.dport, self.src, self.sport)


@dataclass(frozen=True)
class Counts:
    packets: int
    bytes: int


def _set(items: Iterable[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _key(version: int) -> str:
    ip = "ip" if version == 4 else "ip6"
    return f"{ip} saddr . udp sport . {ip} daddr . udp dport"


def _type(version: int) -> str:
    addr = "ipv4_addr" if version == 4 else "ipv6_addr"
    return f"{addr} . inet_service . {addr} . inet_service"


def fastpath_sets(timeouts: dict[int, float]) -> list[str]:
    """The set declarations (inside ``table inet ugate``) for each family with a timeout."""
    out = []
    for version, timeout in sorted(timeouts.items()):
        ms = max(int(timeout * 1000), 1)
        out.append(f"  set fp{version} {{ type {_type(version)}; flags timeout; timeout {ms}ms; "
                   f"size {MAX_ELEMENTS}; }}")
        out.append(f"  set fpc{version} {{ type {_type(version)}; size {MAX_ELEMENTS}; counter; }}")
    return out


def fastpath_skip(version: int) -> str:
    """The statement that hands an offloaded session's packets back to the kernel's forwarding."""
    key = _key(version)
    return (f"meta nfproto ipv{version} meta l4proto udp {key} @fp{version} {key} @fpc{version} "
            f"update @fp{version} {{ {key} }} accept comment \"kernel fast path\"")


def _bypass_plan(bypass: Iterable[Bypass]) -> Iterable[tuple[int, Bypass, int, list[IPNetwork], list[IPNetwork]]]:
    """(position, route, IP version, its dst and src networks of that version) per statement to write."""
    for i, b in enumerate(bypass):
        for version in (4, 6):
            dst = [n for n in b.dst if n.version == version]
            src = [n for n in b.src if n.version == version]
            if (b.dst and not dst) or (b.src and not src):
                continue  # the route cannot match this family
            yield i, b, version, dst, src


def _set_name(position: int, field: str, version: int) -> str:
    return f"bypass{position}_{field}{version}"


def _merged(nets: list[IPNetwork], version: int) -> list[str]:
    """Non-overlapping, non-adjacent elements covering ``nets``: a CIDR where a merged span is one, else
    a ``first-last`` range. On integers, as ipaddress.collapse_addresses takes ~0.3 s per 10,000."""
    bits = 32 if version == 4 else 128
    spans = sorted((first := int(n.network_address), first + (1 << bits - n.prefixlen) - 1) for n in nets)
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    text = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    out = []
    for lo, hi in merged:
        size = hi - lo + 1
        if size & (size - 1) == 0 and lo % size == 0:
            out.append(f"{text(lo)}/{bits - size.bit_length() + 1}")
        else:
            out.append(f"{text(lo)}-{text(hi)}")
    return out


def bypass_sets(bypass: Iterable[Bypass]) -> list[str]:
    """Named interval sets (inside ``table inet ugate``) for the address lists longer than SET_ABOVE.

    Merged first: a named interval set refuses overlapping elements ("conflicting intervals"), where
    an inline one merges them by itself."""
    out = []
    for i, _, version, dst, src in _bypass_plan(bypass):
        for field, nets in (("dst", dst), ("src", src)):
            if len(nets) <= SET_ABOVE:
                continue
            merged = _merged(nets, version)
            rows = [", ".join(merged[j:j + SET_ELEMENTS_PER_LINE])
                    for j in range(0, len(merged), SET_ELEMENTS_PER_LINE)]
            addr = "ipv4_addr" if version == 4 else "ipv6_addr"
            out += [f"  set {_set_name(i, field, version)} {{", f"    type {addr}; flags interval;",
                    "    elements = { " + ",\n                 ".join(rows) + " }", "  }"]
    return out


def bypass_statements(bypass: Iterable[Bypass], prefix: str = "") -> list[str]:
    """``return`` statements (not captured) for each bypass route and family it can match."""
    out = []
    for i, b, version, dst, src in _bypass_plan(bypass):
        ip = "ip" if version == 4 else "ip6"
        parts = [f"meta nfproto ipv{version} meta l4proto {{ tcp, udp }}"]
        for field, nets, where in (("dst", dst, "daddr"), ("src", src, "saddr")):
            if nets:
                named = f"@{_set_name(i, field, version)}" if len(nets) > SET_ABOVE else None
                parts.append(f"{ip} {where} {named or _set(str(n) for n in nets)}")
        if b.ports:
            parts.append("th dport " + _set(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in b.ports))
        name = b.name.replace('"', "'")
        out.append(f'{prefix}{" ".join(parts)} return comment "bypass: route {name}"')
    return out


def element_script(table: str, tuples: Iterable[Tuple5], add: bool = True) -> str:
    """Add (or delete) the liveness and count elements of ``tuples``, as one nft transaction."""
    verb = "add" if add else "delete"
    lines = []
    for t in tuples:
        for name in (f"fp{t.version}", f"fpc{t.version}"):
            lines.append(f"{verb} element inet {table} {name} {{ {t.nft()} }}")
    return "\n".join(lines) + "\n"


def _elements(listing: Any, name: str) -> list[dict[str, Any]]:
    for item in listing.get("nftables", []):
        found = item.get("set")
        if isinstance(found, dict) and found.get("name") == name:
            return [e for e in found.get("elem", []) if isinstance(e, dict)]
    return []


def canonical(address: str) -> str:
    """An address as nft lists it (inet_ntop's form); inet_pton/ntop, as ipaddress costs ~10x more
    and a poll reads every element of the set."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, address))
    except OSError:
        raise ValueError(f"not an address: {address!r}") from None


def _tuple(value: Any) -> Tuple5 | None:
    concat = value.get("concat") if isinstance(value, dict) else None
    if not isinstance(concat, list) or len(concat) != 4:
        return None
    src, sport, dst, dport = concat
    return Tuple5(canonical(str(src)), int(sport), canonical(str(dst)), int(dport))


def parse_live(listing_json: str, name: str) -> set[Tuple5]:
    """The tuples in set ``name`` of ``nft -j list set`` output (elements without counters are plain)."""
    out = set()
    for e in _elements(json.loads(listing_json), name):
        inner = e.get("elem", e)
        t = _tuple(inner.get("val") if isinstance(inner, dict) and "val" in inner else inner)
        if t is not None:
            out.add(t)
    return out


def parse_counts(listing_json: str, name: str) -> dict[Tuple5, Counts]:
    """The counter of each element of set ``name``."""
    out = {}
    for e in _elements(json.loads(listing_json), name):
        inner = e.get("elem")
        if not isinstance(inner, dict):
            continue
        t = _tuple(inner.get("val"))
        counter = inner.get("counter") or {}
        if t is not None:
            out[t] = Counts(int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
    return out


_COUNTED = re.compile(r"([0-9a-fA-F.:]+) \. (\d+) \. ([0-9a-fA-F.:]+) \. (\d+) counter packets (\d+) bytes (\d+)")


def parse_counts_text(text: str) -> dict[Tuple5, Counts]:
    """The counters in ``nft get element`` output (nft 1.0.6 writes it as text even when asked for JSON):
    ``elements = { 10.0.0.2 . 2 . 10.0.0.1 . 1 counter packets 0 bytes 0, ... }``."""
    return {Tuple5(canonical(m[1]), int(m[2]), canonical(m[3]), int(m[4])): Counts(int(m[5]), int(m[6]))
            for m in _COUNTED.finditer(text)}


def payload_bytes(t: Tuple5, counts: Counts) -> int:
    """UDP payload bytes (what the gate counts for relayed datagrams) of an element's IP byte count."""
    return max(counts.bytes - counts.packets * HEADER[t.version], 0)


class FastpathNft:
    """libnftables in-process: an element add is a netlink message, not an ``nft`` process (~ms each),
    which matters when sessions open by the thousand. JSON output for the listings."""

    NFT_CTX_OUTPUT_JSON = 1 << 4

    def __init__(self, table: str) -> None:
        self.table = table
        self._lib = lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_error", "nft_ctx_buffer_output", "nft_ctx_free"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_error_buffer", "nft_ctx_get_output_buffer"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._ctx: int | None = lib.nft_ctx_new(0)
        if not self._ctx:
            raise OSError("libnftables: cannot create a context")
        lib.nft_ctx_buffer_error(self._ctx)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_output_set_flags(self._ctx, self.NFT_CTX_OUTPUT_JSON)

    def run(self, script: str) -> str:
        if self._ctx is None:
            raise ValueError("closed")
        if self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode()) != 0:
            error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            raise OSError(f"nft failed: {error.strip()}")
        return (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()

    def add(self, tuples: Iterable[Tuple5]) -> None:
        self.run(element_script(self.table, tuples, add=True))

    def revive(self, t: Tuple5) -> None:
        """Add ``t``'s liveness element again (its count element never expires)."""
        self.run(f"add element inet {self.table} fp{t.version} {{ {t.nft()} }}\n")

    def delete(self, tuples: Iterable[Tuple5]) -> None:
        """Delete elements one by one: one already gone (expired) must not keep the others."""
        for t in tuples:
            for line in element_script(self.table, [t], add=False).splitlines():
                try:
                    self.run(line + "\n")
                except OSError:
                    pass  # expired meanwhile: nothing to delete

    def live(self, version: int) -> set[Tuple5]:
        """The tuples of one family's liveness set (what a poll reads: no counters, cheaper to list)."""
        listed = self.run(f"list set inet {self.table} fp{version}\n")
        try:
            return parse_live(listed, f"fp{version}")
        except (ValueError, TypeError, AttributeError) as e:  # nft's JSON not as 1.0.6 writes it
            raise OSError(f"unexpected nft listing: {e}") from None

    def counts(self, tuples: Iterable[Tuple5]) -> dict[Tuple5, Counts]:
        """The count elements of ``tuples`` (one family), read in one command when their flows end."""
        tuples = list(tuples)
        if not tuples:
            return {}
        keys = ", ".join(t.nft() for t in tuples)
        return parse_counts_text(self.run(f"get element inet {self.table} fpc{tuples[0].version} {{ {keys} }}\n"))

    def all_counts(self, version: int) -> dict[Tuple5, Counts]:
        """Every count element of one family (at shutdown)."""
        listed = self.run(f"list set inet {self.table} fpc{version}\n")
        try:
            return parse_counts(listed, f"fpc{version}")
        except (ValueError, TypeError, AttributeError) as e:
            raise OSError(f"unexpected nft listing: {e}") from None

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
