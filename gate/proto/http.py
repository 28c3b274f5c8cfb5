"""Pure helpers of the HTTP proxy: request targets, hop-by-hop headers, Basic proxy credentials, and
the text of error answers.

h11 does the HTTP/1 framing; these functions only decide what a forwarding proxy changes (RFC 9110
section 7.6, RFC 9112 section 3.2).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from gate.addr import Endpoint, parse_endpoint

__all__ = [
    "HOP_BY_HOP",
    "IDEMPOTENT",
    "TargetError",
    "check_basic_auth",
    "connect_authority",
    "forward_headers",
    "printable",
    "readable",
    "split_absolute_uri",
]

# Headers that describe one connection, never forwarded (RFC 9110 7.6.1); h11 regenerates framing.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
    }
)

# Methods whose request may be sent twice with the effect of once (RFC 9110 9.2.2): only these are
# retried on a fresh connection when a reused one turns out to be closed.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# How much of a peer's bytes an error text quotes: enough to recognise them, not an echo of the input.
QUOTE_LIMIT = 100

Headers = Iterable[tuple[bytes, bytes]]


class TargetError(ValueError):
    """The request target is not something this proxy can forward (answered with 400)."""


def printable(raw: bytes, limit: int = QUOTE_LIMIT) -> str:
    """``raw`` as text for an error answer or log detail: ASCII as is, other bytes as ``\\xNN``, cut
    after ``limit`` bytes (then ending in "..."). A Python repr (``b'...'``) means nothing to an HTTP client."""
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw[:limit])
    return text + "..." if len(raw) > limit else text


# A bytes literal, or a bytearray repr, inside a library's message (h11 quotes the offending line so).
_LITERAL = r"""\bb(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")"""
_BYTES_REPR = re.compile(rf"bytearray\({_LITERAL}\)|{_LITERAL}")


def readable(message: str) -> str:
    """A protocol library's error message with its bytes reprs turned into quoted text:
    ``illegal request line: bytearray(b'\\x16\\x03')`` reads ``illegal request line: "\\x16\\x03"``."""
    return _BYTES_REPR.sub(lambda m: '"' + next(g for g in m.groups() if g is not None) + '"', message)


def connect_authority(target: bytes) -> Endpoint:
    """The ``host:port`` of a CONNECT request (RFC 9110 9.3.6: authority-form, port required)."""
    try:
        return parse_endpoint(target.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise TargetError(f'CONNECT target "{printable(target)}" is not host:port') from None


def split_absolute_uri(target: bytes) -> tuple[Endpoint, bytes]:
    """Split ``http://host[:port]/path?q`` into the origin and the origin-form target to send it."""
    try:
        text = target.decode("ascii")
        parts = urlsplit(text)
        port = parts.port or 80
        host = parts.hostname
    except (UnicodeDecodeError, ValueError):
        raise TargetError(f'request target "{printable(target)}" is not a URI') from None
    if parts.scheme != "http" or not host:
        if parts.scheme == "https":
            raise TargetError("https:// targets need CONNECT (this proxy does not terminate TLS)")
        raise TargetError(f'request target "{printable(target)}" is not an absolute http:// URI')
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        origin = parse_endpoint(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except ValueError:
        raise TargetError(f'request target "{printable(target)}" has a bad host') from None
    return origin, path.encode("ascii")


def forward_headers(headers: Headers, via: bytes) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (and those named in Connection), append our Via."""
    items = [(name.lower(), value) for name, value in headers]
    named = {
        token.strip().lower()
        for name, value in items
        if name == b"connection"
        for token in value.split(b",")
    }
    kept = [(n, v) for n, v in items if n not in HOP_BY_HOP and n not in named]
    kept.append((b"via", via))
    return kept


def check_basic_auth(headers: Headers, users: Mapping[str, str]) -> bool:
    """True if a ``Proxy-Authorization: Basic`` header names a user with the right password."""
    for name, value in headers:
        if name.lower() != b"proxy-authorization":
            continue
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = users.get(user)
        return bool(sep) and expected is not None and hmac.compare_digest(expected.encode(), password.encode())
    return False
