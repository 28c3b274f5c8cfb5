"""The Flow: one client connection's facts, from accept to the access-log record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gate.addr import Endpoint

if TYPE_CHECKING:
    from splice import Relay

__all__ = ["Flow"]


@dataclass(slots=True)
class Flow:
    """Filled in as the flow advances: listener -> handshake -> route -> relay -> close."""

    listener: str
    client: Endpoint
    dst: Endpoint | None = None  # requested (SOCKS/CONNECT/URI) or original destination
    host: str | None = None  # the name asked for (SOCKS domain, CONNECT authority, Host), else sniffed
    protocol: str | None = None  # sniffed: tls, http, h2c, ssh, socks, unknown; "none": nothing sent in time
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    ech: bool = False  # the hello carried an ECH extension: the real name may be hidden behind ``sni``
    preread: bytes = b""  # bytes read during the handshake that belong upstream, sent first
    started: float = field(default_factory=time.time)
    rule: str | None = None
    action: str | None = None
    upstream: Endpoint | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    path: str | None = None  # "splice" | "copy" (raw relay) or "http" (forwarded request by request)
    close_reason: str = "open"
    relay: Relay | None = None  # set while a relay owns the sockets; its counters are live
    logged: bool = False

    def record(self) -> dict[str, Any]:
        """The access-log record (one JSON object per flow)."""
        return {
            "ts": round(self.started, 3),
            "listener": self.listener,
            "client": str(self.client),
            "dst": str(self.dst) if self.dst else None,
            "host": self.host,
            "protocol": self.protocol,
            "sni": self.sni,
            "alpn": list(self.alpn) if self.alpn else None,
            "ech": self.ech or None,
            "rule": self.rule,
            "action": self.action,
            "upstream": str(self.upstream) if self.upstream else None,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "path": self.path,
            "duration": round(time.time() - self.started, 3),
            "close": self.close_reason,
        }
