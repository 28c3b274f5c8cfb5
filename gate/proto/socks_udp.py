"""The SOCKS5 UDP request header (RFC 1928 section 7), sans-IO: RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA.

A datagram arrives whole, so there is no "need more" here: a datagram cut inside its header is a
SocksUdpError like any other malformed one. Fragments (FRAG != 0) parse, so the shell can count them
before dropping them: RFC 1928 makes reassembly optional and no client we know sends fragments.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass

from gate.proto.socks import ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, SocksError, parse_address
from sniff.result import NeedMore

__all__ = ["HEADER_MAX", "SocksDatagram", "SocksUdpError", "header", "parse_datagram"]

# RSV(2) FRAG(1) ATYP(1) a domain of at most 255 bytes with its length byte, PORT(2): the longest header.
HEADER_MAX = 4 + 1 + 255 + 2


class SocksUdpError(ValueError):
    """A datagram on the relay socket is not a SOCKS UDP request (dropped and counted, never answered)."""


@dataclass(frozen=True, slots=True)
class SocksDatagram:
    host: str  # IPv4 text, IPv6 text without brackets, or a domain
    port: int
    address_type: int
    frag: int  # 0: a whole datagram; anything else is a fragment
    data: bytes


def parse_datagram(buf: bytes) -> SocksDatagram:
    """The destination and payload of one client datagram; SocksUdpError when it is malformed."""
    if len(buf) < 4:
        raise SocksUdpError(f"datagram of {len(buf)} bytes: shorter than a SOCKS UDP header")
    if buf[0] or buf[1]:
        raise SocksUdpError("reserved bytes are not zero")
    try:
        address = parse_address(buf, 3, None)
    except SocksError as e:
        raise SocksUdpError(str(e)) from None
    if isinstance(address, NeedMore):
        raise SocksUdpError("datagram ends inside its SOCKS UDP header")
    host, port, atyp, end = address
    return SocksDatagram(host, port, atyp, buf[2], bytes(buf[end:]))


@functools.lru_cache(maxsize=1024)
def header(host: str, port: int) -> bytes:
    """The header that wraps an answer from ``host:port`` (an address, or a name the client used).
    Cached: a session answers from one remote, so each header is built once."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()  # as the client sent it (parse_datagram reads it as UTF-8)
        if not 0 < len(name) <= 255:
            raise SocksUdpError(f"name of {len(name)} bytes cannot be a SOCKS address") from None
        return b"\x00\x00\x00" + bytes((ATYP_DOMAIN, len(name))) + name + struct.pack("!H", port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return b"\x00\x00\x00" + bytes((atyp,)) + ip.packed + struct.pack("!H", port)
