"""SSH identification string (RFC 4253 4.2): ``SSH-2.0-softwareversion comments CR LF``."""

from __future__ import annotations

from dataclasses import dataclass

from sniff.result import NEED_MORE, NeedMore, NotThisProtocol

__all__ = ["MAX_BANNER", "SshBanner", "parse_ssh_banner"]

MAX_BANNER = 255  # RFC 4253: the identification line is at most 255 characters, CR LF included
_PREFIX = b"SSH-"


@dataclass(frozen=True)
class SshBanner:
    protocol: str  # "2.0" (or "1.99")
    software: str
    consumed: int


def parse_ssh_banner(data: bytes) -> SshBanner | NeedMore:
    if data[: len(_PREFIX)] != _PREFIX[: len(data)]:
        raise NotThisProtocol("not an SSH identification string")
    end = data.find(b"\n", 0, MAX_BANNER)
    if end < 0:
        if len(data) >= MAX_BANNER:
            raise NotThisProtocol("SSH identification string too long")
        return NEED_MORE
    line = data[: end + 1].rstrip(b"\r\n")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise NotThisProtocol("SSH identification string is not ASCII") from None
    parts = text.split("-", 2)
    if len(parts) < 3 or parts[1] not in ("2.0", "1.99") or not parts[2]:
        raise NotThisProtocol("bad SSH identification string")
    return SshBanner(parts[1], parts[2].split(" ", 1)[0], end + 1)
