"""The Flow: one client connection's (or UDP session's) facts, its state, and how it ended.

A flow's life is a few named states (``FlowState``) that the flow runner (gate.runner) moves it
through; whatever path it took, it ends in exactly one place, ``Context.finish`` (gate.context), which
writes its access-log record.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gate.addr import Endpoint
from gate.vocab import Action

if TYPE_CHECKING:
    from splice import Relay

__all__ = ["MAX_HOPS", "Close", "Flow", "FlowState"]

_ids = itertools.count(1)
# A flow that crossed this many gates (mesh metadata, PROXY protocol v2 hop TLVs) is refused: a loop
# through other hosts (A via B, B via A) would otherwise open connections until something runs out.
# Real meshes are one or two hops deep.
MAX_HOPS = 8


class FlowState(enum.Enum):
    """Where a flow is. Every flow starts ACCEPTED and ends DONE; the states between are visited in
    this order, each at most once, and any of them may skip to DONE."""

    ACCEPTED = 1  # a client connected (or a first datagram came); nothing read yet
    HANDSHAKE = 2  # the kind reads its protocol's handshake (SOCKS, HTTP request head, PROXY header)
    SNIFFING = 3  # the first bytes are read to classify the protocol before routing
    ROUTED = 4  # a route decided where the flow goes
    CONNECTING = 5  # the upstream (TCP connect, mesh stream, UDP socket) is being opened
    RELAYING = 6  # bytes move both ways
    DONE = 7  # ended: logged exactly once


class Close(enum.StrEnum):
    """Why a flow ended, the access log's ``close`` field (details go to ``detail``)."""

    EOF = "eof"  # both sides closed cleanly
    DONE = "done"  # a forwarded HTTP request was answered
    CLOSED = "closed"  # a mesh stream ended without error
    IDLE = "idle timeout"
    CLIENT_RESET = "client reset"  # the client's side broke (reset, error) during the relay
    UPSTREAM_RESET = "upstream reset"
    HANDSHAKE_TIMEOUT = "handshake timeout"
    CLIENT_ERROR = "client error"  # bad handshake, or the client went away before the relay
    REJECTED = "rejected"  # a route (or a peer's allow list) said no
    REFUSED = "refused"  # a policy that holds for every flow said no (a loop, not redirected, ...)
    UPSTREAM_ERROR = "upstream error"  # the upstream could not be reached
    SHUTDOWN = "shutdown"
    INTERNAL = "internal error"  # a bug; logged with its traceback
    INTERCEPT_ERROR = "intercept error"  # the route's interceptor raised: that flow is reset (gate.intercept)


@dataclass(slots=True, eq=False)
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
    hops: int = 0  # gates this flow crossed before this one (mesh metadata)
    started: float = field(default_factory=time.time)
    rule: str | None = None
    action: Action | None = None
    upstream: Endpoint | None = None
    peer: str | None = None  # the mesh peer that carried the flow (route action via)
    bytes_up: int = 0
    bytes_down: int = 0
    path: str | None = None  # "splice" | "copy" (raw relay), "http" (request by request), "h2", "udp"
    state: FlowState = FlowState.ACCEPTED
    close: Close | None = None
    detail: str | None = None  # the close reason's particulars (which rule, which error)
    relay: Relay | None = None  # set while a relay owns the sockets; its counters are live
    counted_as: str | None = None  # the client address its listener counts it under (max_flows_per_source)
    pending: bool = False  # also counted among that address's pending handshakes, until routed or ended
    intercept: Callable[..., Any] | None = None  # the route's interceptor (gate.intercept), set when routed
    id: int = field(default_factory=_ids.__next__)

    def closing(self, close: Close, detail: str | None = None) -> None:
        """Say why the flow ends; the first reason given stands (later ones are consequences)."""
        if self.close is None:
            self.close, self.detail = close, detail

    def record(self) -> dict[str, Any]:
        """The access-log record (one JSON object per flow)."""
        return {
            "ts": round(self.started, 3),
            "id": self.id,
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
            "peer": self.peer,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "path": self.path,
            "duration": round(time.time() - self.started, 3),
            "close": str(self.close) if self.close is not None else None,
            "detail": self.detail,
        }
