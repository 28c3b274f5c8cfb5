"""TLS ClientHello: server name, ALPN, versions and ECH presence, from the first bytes of a flow.

Pure: ``parse_client_hello(data)`` returns a frozen ClientHello, NEED_MORE, or raises NotThisProtocol.
The handshake message may span several TLS records (and any number of TCP segments).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sniff.result import NEED_MORE, NeedMore, NotThisProtocol

__all__ = ["MAX_HELLO", "ClientHello", "parse_client_hello", "parse_handshake_message"]

# A ClientHello larger than this is not sniffed: real ones are < 2 KiB, post-quantum key shares push
# them to about 1.8 KiB more, and 16 KiB is the TLS record limit (RFC 8446 5.1).
MAX_HELLO = 16 * 1024

CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
# encrypted_client_hello (draft-ietf-tls-esni): the SNI seen is the outer one, maybe a decoy (Chromium
# always sends a GREASE ECH, which looks the same, with the real name outside)
EXT_ECH = 0xFE0D
_EXTENSION_HEADER = struct.Struct(">HH")  # type, length


@dataclass(frozen=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]
    legacy_version: int  # e.g. 0x0303
    versions: tuple[int, ...]  # supported_versions, or () when absent (TLS <= 1.2 client)
    ech: bool  # the real server name is encrypted; ``sni`` is the public (outer) name
    consumed: int  # bytes of the records that carried the hello


def _records(data: bytes) -> tuple[bytes, int] | NeedMore:
    """Concatenate handshake-record payloads until the first handshake message is complete."""
    if (data[:1] and data[0] != CONTENT_HANDSHAKE) or (data[1:2] and data[1] != 3):
        raise NotThisProtocol("not a TLS handshake record")
    if len(data) > 5 and data[5] != HANDSHAKE_CLIENT_HELLO:
        raise NotThisProtocol("first handshake message is not a ClientHello")
    if len(data) >= 9:  # the usual case, the hello in one record: cut it out without the loop below
        length, need = int.from_bytes(data[3:5], "big"), 4 + int.from_bytes(data[6:9], "big")
        if need <= length <= MAX_HELLO and len(data) >= 5 + length:
            return data[5 : 5 + need], 5 + length
    body = b""
    pos = 0
    while True:
        if len(data) - pos < 5:
            return NEED_MORE
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if data[pos] != CONTENT_HANDSHAKE or data[pos + 1] != 3 or not 0 < length <= MAX_HELLO:
            raise NotThisProtocol("not a TLS handshake record")
        if len(data) - pos - 5 < length:
            return NEED_MORE
        body += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(body) >= 4:
            need = 4 + int.from_bytes(body[1:4], "big")
            if need > MAX_HELLO:
                raise NotThisProtocol(f"ClientHello over {MAX_HELLO} bytes")
            if len(body) >= need:
                return body[:need], pos


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise NotThisProtocol(f"{what} is not ASCII") from None
    if not text.isprintable():
        raise NotThisProtocol(f"{what} has control characters")
    return text


def parse_client_hello(data: bytes) -> ClientHello | NeedMore:
    """Parse the ClientHello at the start of ``data`` (TLS records as they came off the wire)."""
    found = _records(data)
    if isinstance(found, NeedMore):
        return NEED_MORE
    message, consumed = found
    return parse_handshake_message(message, consumed)


def _u16(data: bytes, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise NotThisProtocol("truncated field in ClientHello")
    return data[pos] << 8 | data[pos + 1]


def _vector(data: bytes, pos: int, end: int, length_size: int) -> tuple[int, int]:
    """The bounds (start, stop) of the vector at ``pos`` whose length prefix has ``length_size`` bytes."""
    if length_size == 1:
        if pos >= end:
            raise NotThisProtocol("truncated field in ClientHello")
        start, stop = pos + 1, pos + 1 + data[pos]
    else:
        start, stop = pos + 2, pos + 2 + _u16(data, pos, end)
    if stop > end:
        raise NotThisProtocol("truncated field in ClientHello")
    return start, stop


def parse_handshake_message(message: bytes, consumed: int) -> ClientHello:
    """A whole ClientHello handshake message (type, 3-byte length, body), as TLS records, DTLS (once
    reframed) and QUIC CRYPTO frames carry it; ``consumed`` is recorded in the result.

    Runs for every TLS flow, so it walks offsets over the one buffer instead of slicing each field
    (a ClientHello has a dozen or more extensions); every read is bounds-checked against the
    enclosing vector, and an overrun is NotThisProtocol."""
    end = len(message)
    if end < 4 or message[0] != HANDSHAKE_CLIENT_HELLO:
        raise NotThisProtocol("not a ClientHello message")
    if int.from_bytes(message[1:4], "big") != end - 4:
        raise NotThisProtocol("ClientHello length does not match")
    legacy_version = _u16(message, 4, end)
    pos = 4 + 2 + 32  # random
    if pos > end:
        raise NotThisProtocol("truncated field in ClientHello")
    pos = _vector(message, pos, end, 1)[1]  # legacy session id
    pos = _vector(message, pos, end, 2)[1]  # cipher suites
    pos = _vector(message, pos, end, 1)[1]  # compression methods
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    ech = False
    if pos < end:
        pos, extensions_end = _vector(message, pos, end, 2)
        while pos < extensions_end:  # inlined: a dozen or more rounds per hello
            start = pos + 4
            if start > extensions_end:
                raise NotThisProtocol("truncated extension in ClientHello")
            kind, length = _EXTENSION_HEADER.unpack_from(message, pos)
            pos = start + length
            if pos > extensions_end:
                raise NotThisProtocol("truncated extension in ClientHello")
            if kind == EXT_SERVER_NAME:
                at, names_end = _vector(message, start, pos, 2)
                while at < names_end:
                    name_type = message[at]
                    name_start, at = _vector(message, at + 1, names_end, 2)
                    if name_type == 0 and sni is None:
                        sni = _text(message[name_start:at], "server name").lower()
            elif kind == EXT_ALPN:
                at, protocols_end = _vector(message, start, pos, 2)
                found_alpn = []
                while at < protocols_end:
                    name_start, at = _vector(message, at, protocols_end, 1)
                    found_alpn.append(_text(message[name_start:at], "ALPN protocol"))
                alpn = tuple(found_alpn)
            elif kind == EXT_SUPPORTED_VERSIONS:
                at, listed_end = _vector(message, start, pos, 1)
                versions = struct.unpack_from(f">{(listed_end - at) // 2}H", message, at)
            elif kind == EXT_ECH:
                ech = True
    return ClientHello(sni, alpn, legacy_version, versions, ech, consumed)
