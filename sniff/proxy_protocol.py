"""PROXY protocol v1 (text) and v2 (binary) headers: parse what a load balancer sends, build what an
upstream expects (haproxy.org/download/2.9/doc/proxy-protocol.txt)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from sniff.result import NEED_MORE, NeedMore, NotThisProtocol

__all__ = ["TLV_HOPS", "V1_MAX", "V2_SIGNATURE", "ProxyHeader", "build_v1", "build_v2", "parse_proxy_header"]

V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 16 + 2048  # address block plus a generous TLV allowance; longer headers are refused
# A custom TLV (PP2_TYPE_MIN_CUSTOM, 0xE0: the spec leaves 0xE0-0xEF to applications) in which gates count
# the gates a flow crossed, so a loop through PROXY-speaking hops ends; one byte of value.
TLV_HOPS = 0xE0


@dataclass(frozen=True)
class ProxyHeader:
    source: tuple[str, int] | None  # None: LOCAL / UNKNOWN (the connection is the proxy's own)
    destination: tuple[str, int] | None
    consumed: int
    hops: int = 0  # gates crossed, from a v2 TLV_HOPS (v1 cannot say: 0)


def _v1(data: bytes) -> ProxyHeader | NeedMore:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise NotThisProtocol("PROXY v1 line too long")
        return NEED_MORE
    try:
        parts = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise NotThisProtocol("PROXY v1 line is not ASCII") from None
    if parts[:2] == ["PROXY", "UNKNOWN"]:
        return ProxyHeader(None, None, end + 2)
    if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
        raise NotThisProtocol("bad PROXY v1 line")
    try:
        src, dst = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
        sport, dport = int(parts[4]), int(parts[5])
    except ValueError:
        raise NotThisProtocol("bad PROXY v1 address") from None
    if src.version != dst.version or src.version != (4 if parts[1] == "TCP4" else 6) or not (
            0 <= sport < 65536 and 0 <= dport < 65536) or not (parts[4].isdigit() and parts[5].isdigit()):
        raise NotThisProtocol("bad PROXY v1 address")
    return ProxyHeader((str(src), sport), (str(dst), dport), end + 2)


def _v2(data: bytes) -> ProxyHeader | NeedMore:
    if len(data) < 16:
        return NEED_MORE
    version_command, family = data[12], data[13]
    if version_command >> 4 != 2 or version_command & 0xF not in (0, 1):
        raise NotThisProtocol("bad PROXY v2 version/command")
    length = int.from_bytes(data[14:16], "big")
    if length > V2_MAX:
        raise NotThisProtocol("PROXY v2 header too long")
    if len(data) < 16 + length:
        return NEED_MORE
    block = data[16 : 16 + length]
    if version_command & 0xF == 0 or family >> 4 not in (1, 2):  # LOCAL, or a family we do not map
        return ProxyHeader(None, None, 16 + length)
    size = 4 if family >> 4 == 1 else 16
    if len(block) < 2 * size + 4:
        raise NotThisProtocol("PROXY v2 address block too short")
    af = socket.AF_INET if size == 4 else socket.AF_INET6
    src = socket.inet_ntop(af, block[:size])
    dst = socket.inet_ntop(af, block[size : 2 * size])
    sport, dport = struct.unpack_from("!HH", block, 2 * size)
    return ProxyHeader((src, sport), (dst, dport), 16 + length, _hops(block[2 * size + 4 :]))


def _hops(tlvs: bytes) -> int:
    """TLV_HOPS's value among the TLVs after the address block (a malformed TLV list ends the search)."""
    at = 0
    while at + 3 <= len(tlvs):
        kind, size = tlvs[at], int.from_bytes(tlvs[at + 1 : at + 3], "big")
        if at + 3 + size > len(tlvs):
            break
        if kind == TLV_HOPS and size == 1:
            return tlvs[at + 3]
        at += 3 + size
    return 0


def parse_proxy_header(data: bytes) -> ProxyHeader | NeedMore:
    """A v1 or v2 header at the start of ``data``."""
    if data[:12] == V2_SIGNATURE[: min(len(data), 12)] and data[:1] == b"\r":
        return _v2(data) if len(data) >= 12 else NEED_MORE
    if data[:6] == b"PROXY "[: min(len(data), 6)]:
        return _v1(data) if len(data) >= 6 else NEED_MORE
    raise NotThisProtocol("no PROXY protocol header")


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def build_v2(source: tuple[str, int], destination: tuple[str, int], hops: int = 0) -> bytes:
    """A v2 PROXY header; with ``hops``, a TLV_HOPS saying how many gates the flow crossed (at most 255)."""
    v6 = ":" in source[0]
    af = socket.AF_INET6 if v6 else socket.AF_INET
    block = socket.inet_pton(af, source[0]) + socket.inet_pton(af, destination[0])
    block += struct.pack("!HH", source[1], destination[1])
    if hops:
        block += bytes([TLV_HOPS, 0, 1, min(hops, 255)])
    return V2_SIGNATURE + bytes([0x21, 0x21 if v6 else 0x11]) + len(block).to_bytes(2, "big") + block
