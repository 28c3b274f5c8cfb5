"""TLS ClientHello: server name, ALPN, versions and ECH presence, from the first bytes of a flow.

Pure: ``parse_client_hello(data)`` returns a frozen ClientHello, NEED_MORE, or raises NotThisProtocol.
The handshake message may span several TLS records (and any number of TCP segments).
"""

from __future__ import annotations

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
EXT_ECH = 0xFE0D  # encrypted_client_hello (draft-ietf-tls-esni): the outer SNI is then a decoy


@dataclass(frozen=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]
    legacy_version: int  # e.g. 0x0303
    versions: tuple[int, ...]  # supported_versions, or () when absent (TLS <= 1.2 client)
    ech: bool  # the real server name is encrypted; ``sni`` is the public (outer) name
    consumed: int  # bytes of the records that carried the hello


class _Reader:
    """Bounds-checked reads over one complete handshake message; overruns are NotThisProtocol."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise NotThisProtocol("truncated field in ClientHello")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.uint(length_size))

    def done(self) -> bool:
        return self.pos >= len(self.data)


def _records(data: bytes) -> tuple[bytes, int] | NeedMore:
    """Concatenate handshake-record payloads until the first handshake message is complete."""
    if (data[:1] and data[0] != CONTENT_HANDSHAKE) or (data[1:2] and data[1] != 3):
        raise NotThisProtocol("not a TLS handshake record")
    if len(data) > 5 and data[5] != HANDSHAKE_CLIENT_HELLO:
        raise NotThisProtocol("first handshake message is not a ClientHello")
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


def parse_handshake_message(message: bytes, consumed: int) -> ClientHello:
    """A whole ClientHello handshake message (type, 3-byte length, body), as TLS records, DTLS (once
    reframed) and QUIC CRYPTO frames carry it; ``consumed`` is recorded in the result."""
    if len(message) < 4 or message[0] != HANDSHAKE_CLIENT_HELLO:
        raise NotThisProtocol("not a ClientHello message")
    if int.from_bytes(message[1:4], "big") != len(message) - 4:
        raise NotThisProtocol("ClientHello length does not match")
    r = _Reader(message[4:])
    legacy_version = r.uint(2)
    r.take(32)  # random
    r.vector(1)  # legacy session id
    r.vector(2)  # cipher suites
    r.vector(1)  # compression methods
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    ech = False
    if not r.done():
        extensions = _Reader(r.vector(2))
        while not extensions.done():
            kind = extensions.uint(2)
            ext = _Reader(extensions.vector(2))
            if kind == EXT_SERVER_NAME:
                names = _Reader(ext.vector(2))
                while not names.done():
                    name_type, name = names.uint(1), names.vector(2)
                    if name_type == 0 and sni is None:
                        sni = _text(name, "server name").lower()
            elif kind == EXT_ALPN:
                protocols = _Reader(ext.vector(2))
                found_alpn = []
                while not protocols.done():
                    found_alpn.append(_text(protocols.vector(1), "ALPN protocol"))
                alpn = tuple(found_alpn)
            elif kind == EXT_SUPPORTED_VERSIONS:
                listed = _Reader(ext.vector(1))
                versions = tuple(listed.uint(2) for _ in range(len(listed.data) // 2))
            elif kind == EXT_ECH:
                ech = True
    return ClientHello(sni, alpn, legacy_version, versions, ech, consumed)
