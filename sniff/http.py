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
_METHOD = re.compile(rb"^[A-Z]{3,12} ")
_REQUEST_LINE = re.compile(rb"^([A-Z]{3,12}) (\S+) HTTP/1\.([01])\r?\n")
_HOST_HEADER = re.compile(rb"\n[ \t]*host[ \t]*:([^\r\n]*)", re.IGNORECASE)  # the first Host header


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
    head_end = data.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if head_end < 0:
        head_end = data.find(b"\n\n", 0, MAX_HEAD + 2)
    if not _METHOD.match(data[:14]) and (len(data) >= 14 or not re.match(rb"^[A-Z]{0,12}$", data[:14])):
        raise NotThisProtocol("not an HTTP/1 request line")
    if head_end < 0:
        if len(data) > MAX_HEAD:
            raise NotThisProtocol(f"request head over {MAX_HEAD} bytes")
        line_end = data.find(b"\n")
        if line_end >= 0 and not _REQUEST_LINE.match(data[: line_end + 1]):
            raise NotThisProtocol("bad HTTP/1 request line")
        return NEED_MORE
    consumed = head_end + (4 if data[head_end : head_end + 4] == b"\r\n\r\n" else 2)
    head = data[:consumed]
    match = _REQUEST_LINE.match(head)
    if match is None:
        raise NotThisProtocol("bad HTTP/1 request line")
    method, target, minor = match.group(1).decode(), match.group(2).decode("latin-1"), match.group(3).decode()
    found = _HOST_HEADER.search(head, match.end() - 1)  # one regex pass: this runs for every sniffed flow
    host = _host_of(found.group(1).decode("latin-1")) if found else None
    if host is None and "://" in target:
        host = _host_of(target.split("://", 1)[1].split("/", 1)[0])
    return HttpRequest(method, target, f"1.{minor}", host or None, consumed)
