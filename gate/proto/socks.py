"""SOCKS5 (RFC 1928, RFC 1929 username/password: CONNECT and UDP ASSOCIATE) and SOCKS4/4a CONNECT, server side,
sans-IO.

Each parser takes the bytes received so far and returns a frozen message (with ``consumed``), NEED_MORE,
or raises SocksError carrying the reply to send before closing. Nothing else escapes on any input.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from sniff.result import NEED_MORE, NeedMore  # the same "read more" outcome every sans-IO parser shares

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CONNECT",
    "MAX_NAME",
    "NEED_MORE",
    "NO_ACCEPTABLE",
    "NO_AUTH",
    "UDP_ASSOCIATE",
    "USERPASS",
    "Credentials",
    "Greeting",
    "NeedMore",
    "Reply",
    "Socks4Request",
    "Socks5Request",
    "SocksError",
    "auth_reply",
    "method_reply",
    "parse_address",
    "parse_credentials",
    "parse_first",
    "parse_request",
    "socks4_reply",
    "socks5_reply",
]

# SOCKS4 user ids and 4a domains are NUL-terminated with no length: without a cap a client could make us
# buffer forever. 255 matches the longest DNS name and the SOCKS5 length byte.
MAX_NAME = 255

NO_AUTH = 0x00
USERPASS = 0x02
NO_ACCEPTABLE = 0xFF
CONNECT = 0x01
UDP_ASSOCIATE = 0x03
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04


class Reply(IntEnum):
    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class SocksError(Exception):
    """The client broke the protocol; ``reply`` (if any) is sent before the connection is closed."""

    def __init__(self, message: str, reply: bytes | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Greeting:
    version: int
    methods: tuple[int, ...]
    consumed: int


@dataclass(frozen=True)
class Socks4Request:
    host: str  # dotted IPv4, or the SOCKS4a domain
    port: int
    user: str
    consumed: int


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    consumed: int


@dataclass(frozen=True)
class Socks5Request:
    command: int
    host: str  # IPv4 text, IPv6 text without brackets, or a domain
    port: int
    address_type: int
    consumed: int


def socks5_reply(code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT."""
    try:
        ip = ipaddress.ip_address(bind_host)
    except ValueError:
        ip = ipaddress.IPv4Address(0)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((5, code, 0, atyp)) + ip.packed + struct.pack("!H", bind_port)


def socks4_reply(granted: bool) -> bytes:
    return bytes((0, 0x5A if granted else 0x5B)) + b"\x00" * 6


def method_reply(method: int) -> bytes:
    return bytes((5, method))


def auth_reply(ok: bool) -> bytes:
    return bytes((1, 0 if ok else 1))


def _text(raw: bytes, what: str, reply: bytes | None) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SocksError(f"{what} is not UTF-8", reply) from None
    if not text.isprintable():
        raise SocksError(f"{what} has control characters", reply)
    return text


def parse_first(buf: bytes) -> Greeting | Socks4Request | NeedMore:
    """The client's first message: a SOCKS5 method selection or a SOCKS4/4a CONNECT request."""
    if not buf:
        return NEED_MORE
    if buf[0] == 5:
        return _parse_greeting(buf)
    if buf[0] == 4:
        return _parse_socks4(buf)
    raise SocksError(f"not SOCKS (first byte {buf[0]:#04x})")


def _parse_greeting(buf: bytes) -> Greeting | NeedMore:
    if len(buf) < 2:
        return NEED_MORE
    count = buf[1]
    if count == 0:
        raise SocksError("SOCKS5 greeting offers no method", method_reply(NO_ACCEPTABLE))
    if len(buf) < 2 + count:
        return NEED_MORE
    return Greeting(5, tuple(buf[2 : 2 + count]), 2 + count)


def _nul_terminated(buf: bytes, start: int, what: str) -> tuple[bytes, int] | NeedMore:
    end = buf.find(b"\x00", start, start + MAX_NAME + 1)
    if end < 0:
        if len(buf) - start > MAX_NAME:
            raise SocksError(f"SOCKS4 {what} longer than {MAX_NAME} bytes", socks4_reply(False))
        return NEED_MORE
    return buf[start:end], end + 1


def _parse_socks4(buf: bytes) -> Socks4Request | NeedMore:
    if len(buf) < 8:
        return NEED_MORE
    if buf[1] != CONNECT:
        raise SocksError(f"SOCKS4 command {buf[1]} not supported", socks4_reply(False))
    port = int.from_bytes(buf[2:4], "big")
    ip = buf[4:8]
    user = _nul_terminated(buf, 8, "user id")
    if isinstance(user, NeedMore):
        return NEED_MORE
    user_raw, pos = user
    user_text = _text(user_raw, "SOCKS4 user id", socks4_reply(False))
    if ip[:3] == b"\x00\x00\x00" and ip[3] != 0:  # SOCKS4a: 0.0.0.x means "a domain follows"
        name = _nul_terminated(buf, pos, "domain")
        if isinstance(name, NeedMore):
            return NEED_MORE
        name_raw, pos = name
        if not name_raw:
            raise SocksError("SOCKS4a empty domain", socks4_reply(False))
        host = _text(name_raw, "SOCKS4a domain", socks4_reply(False))
    else:
        host = str(ipaddress.IPv4Address(ip))
    return Socks4Request(host, port, user_text, pos)


def parse_credentials(buf: bytes) -> Credentials | NeedMore:
    """RFC 1929: VER(1) ULEN UNAME PLEN PASSWD."""
    if not buf:
        return NEED_MORE
    if buf[0] != 1:
        raise SocksError(f"username/password version {buf[0]} (expected 1)", auth_reply(False))
    if len(buf) < 2:
        return NEED_MORE
    ulen = buf[1]
    if len(buf) < 3 + ulen:
        return NEED_MORE
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return NEED_MORE
    user = _text(buf[2 : 2 + ulen], "user name", auth_reply(False))
    password = _text(buf[3 + ulen : end], "password", auth_reply(False))
    return Credentials(user, password, end)


def parse_address(buf: bytes, start: int, reply: bytes | None) -> tuple[str, int, int, int] | NeedMore:
    """ATYP DST.ADDR DST.PORT at ``start`` (requests and UDP headers share it): (host, port, address
    type, end), NEED_MORE, or SocksError carrying ``reply`` (or the address-type reply)."""
    if len(buf) <= start:
        return NEED_MORE
    atyp = buf[start]
    pos = start + 1
    if atyp == ATYP_IPV4:
        end = pos + 4
        if len(buf) < end + 2:
            return NEED_MORE
        host = str(ipaddress.IPv4Address(buf[pos:end]))
    elif atyp == ATYP_IPV6:
        end = pos + 16
        if len(buf) < end + 2:
            return NEED_MORE
        host = str(ipaddress.IPv6Address(buf[pos:end]))
    elif atyp == ATYP_DOMAIN:
        if len(buf) <= pos:
            return NEED_MORE
        end = pos + 1 + buf[pos]
        if len(buf) < end + 2:
            return NEED_MORE
        if buf[pos] == 0:
            raise SocksError("SOCKS5 empty domain", reply)
        host = _text(buf[pos + 1 : end], "SOCKS5 domain", reply)
    else:
        raise SocksError(f"SOCKS5 address type {atyp}",
                         reply and socks5_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED))
    return host, int.from_bytes(buf[end : end + 2], "big"), atyp, end + 2


def parse_request(buf: bytes) -> Socks5Request | NeedMore:
    """VER CMD RSV ATYP DST.ADDR DST.PORT; CONNECT and UDP ASSOCIATE are supported (BIND is not)."""
    if len(buf) < 4:
        return NEED_MORE
    if buf[0] != 5:
        raise SocksError(f"SOCKS5 request version {buf[0]}", socks5_reply(Reply.GENERAL_FAILURE))
    if buf[1] not in (CONNECT, UDP_ASSOCIATE):
        raise SocksError(f"SOCKS5 command {buf[1]} not supported", socks5_reply(Reply.COMMAND_NOT_SUPPORTED))
    address = parse_address(buf, 3, socks5_reply(Reply.GENERAL_FAILURE))
    if isinstance(address, NeedMore):
        return NEED_MORE
    host, port, atyp, end = address
    return Socks5Request(buf[1], host, port, atyp, end)
