"""HTTP/1.x request heads (method, target, Host) and the HTTP/2 prior-knowledge preface (h2c).

Sniffing only: enough of the head to route on, not a parser of the whole request (h11 does that
where a listener speaks HTTP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sniff.result import NEED_MORE, NeedMore, NotThisProtocol

__all__ = ["H2_PREFACE", "MAX_HEAD", "HttpRequest", "parse_h2_preface", "parse_http_request"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A request head beyond this is not sniffed further (h11's default limit is the same order).
MAX_HEAD = 16 * 1024
_REQUEST_LINE = re.compile(rb"([A-Z]{3,12}) (\S+) HTTP/1\.([01])\r?\n")
# What the start of a request may look like before its line ends: a method, or a prefix of one
_METHOD_SO_FAR = re.compile(rb"[A-Z]{3,12} |[A-Z]{0,12}\Z")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str
    version: str  # "1.0" | "1.1"
    host: str | None  # from the Host header, or an absolute-form target; lower-case, without port
    consumed: int  # the length of the head, blank line included


def parse_h2_preface(data: bytes) -> bool | NeedMore:
    """True for the h2c connection preface; NotThisProtocol when it cannot become one."""
    if data[: len(H2_PREFACE)] == H2_PREFACE[: len(data)]:
        return True if len(data) >= len(H2_PREFACE) else NEED_MORE
    raise NotThisProtocol("not the HTTP/2 preface")


def _host_of(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def parse_http_request(data: bytes) -> HttpRequest | NeedMore:
    # Runs for every sniffed flow that starts with a capital letter: a complete head takes one regex
    # (the request line) and bytes methods for the rest; an incomplete line is only checked on its first
    # 14 bytes (a method and a space), so a client sending byte by byte costs one memchr per call.
    line_end = data.find(b"\n", 0, MAX_HEAD)
    if line_end < 0:
        if len(data) > MAX_HEAD:
            raise NotThisProtocol(f"request head over {MAX_HEAD} bytes")
        if _METHOD_SO_FAR.match(data, 0, 14) is None:
            raise NotThisProtocol("not an HTTP/1 request line")
        return NEED_MORE
    line = _REQUEST_LINE.fullmatch(data, 0, line_end + 1)
    if line is None:
        raise NotThisProtocol("bad HTTP/1 request line")
    head_end = data.find(b"\r\n\r\n", line_end - 1, MAX_HEAD + 4)  # the line holds no blank line
    if head_end >= 0:
        consumed = head_end + 4
    elif (head_end := data.find(b"\n\n", line_end, MAX_HEAD + 2)) >= 0:
        consumed = head_end + 2
    elif len(data) > MAX_HEAD:
        raise NotThisProtocol(f"request head over {MAX_HEAD} bytes")
    else:
        return NEED_MORE
    method, target, minor = line.groups()
    # the first Host field (RFC 9112 allows no space before the colon; a line starting with space
    # continues the previous field)
    fields = data[line_end:consumed].lower()
    at = fields.find(b"\nhost:")
    host = None
    if at >= 0:
        host = _host_of(fields[at + 6 : fields.find(b"\n", at + 6)].decode("latin-1"))
    elif b"://" in target:
        host = _host_of(target.split(b"://", 1)[1].split(b"/", 1)[0].decode("latin-1"))
    return HttpRequest(method.decode(), target.decode("latin-1"), "1.1" if minor == b"1" else "1.0", host or None,
                       consumed)
