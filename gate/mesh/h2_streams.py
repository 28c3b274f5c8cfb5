"""HTTP/2 CONNECT streams as the mesh transport's streams: flow metadata as request headers, errors
as response statuses, and the serving side's ``Stream`` over a session's stream.

Everything here that knows HTTP/2 (stream ids, statuses, h2 error codes) stays here and in
gate.mesh.session; gate.mesh.inbound sees only ``transport.Stream`` and ``FlowMeta``.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Mapping

import h2.errors

from gate.addr import parse_endpoint
from gate.config import PeerSpec
from gate.errors import (
    ClientProtocolError,
    GateError,
    RefusedByPolicy,
    RejectedByRule,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gate.flow import Close
from gate.mesh.h2_exchange import EXCHANGE_HEADER, serve_exchange
from gate.mesh.session import Bridge, RequestHandler, Session
from gate.mesh.transport import Exchange, FlowMeta, Stream, StreamEnd, stream_end
from gate.mesh.trust import Trust

__all__ = ["ERROR_HEADER", "Abandon", "H2Stream", "Serve", "answer_for", "error_for_status", "meta_headers", "meta_of",
           "request_handler"]

# The peer's reason for a failed CONNECT, in a response header, so the client's answer is exact
ERROR_HEADER = "ugate-error"
MAX_ALPN = 16  # offers carried; a TLS client offers a handful


def meta_headers(meta: FlowMeta) -> list[tuple[str, str]]:
    """The CONNECT request's headers for ``meta`` (the authority carries the destination)."""
    headers = [("ugate-client", str(meta.client)), ("ugate-hops", str(meta.hops))]
    for name, value in (("ugate-host", meta.host), ("ugate-protocol", meta.protocol), ("ugate-sni", meta.sni)):
        if value:
            headers.append((name, value))
    if meta.alpn:
        headers.append(("ugate-alpn", ",".join(meta.alpn[:MAX_ALPN])))
    if meta.ech:
        headers.append(("ugate-ech", "1"))
    return headers


def meta_of(headers: dict[str, str]) -> FlowMeta:
    """The flow a CONNECT request carries; ClientProtocolError when it is not one we serve."""
    if headers.get(":method") != "CONNECT":
        raise ClientProtocolError("only CONNECT is served")
    try:
        dst = parse_endpoint(headers.get(":authority", ""))
    except ValueError as e:
        raise ClientProtocolError(f"bad authority: {e}") from None
    try:
        client = parse_endpoint(headers.get("ugate-client", ""))
    except ValueError:
        client = parse_endpoint("0.0.0.0:1")  # a peer that does not say: routes on src match nothing
    hops = headers.get("ugate-hops", "1")
    if not hops.isdigit() or len(hops) > 3:
        raise ClientProtocolError(f"bad ugate-hops {hops[:8]!r}")
    alpn = tuple(a for a in headers.get("ugate-alpn", "").split(",") if a)[:MAX_ALPN]
    return FlowMeta(dst, client, headers.get("ugate-host") or None, headers.get("ugate-protocol") or None,
                    headers.get("ugate-sni") or None, alpn, headers.get("ugate-ech") == "1", int(hops))


def answer_for(error: GateError) -> tuple[int, str]:
    """HTTP status and ugate-error reason for a flow the serving gate could not connect."""
    if isinstance(error, (RejectedByRule, RefusedByPolicy)):
        return 403, "rejected"
    if isinstance(error, ClientProtocolError):
        return 400, "bad request"
    if isinstance(error, UpstreamTimeout):
        return 504, "timeout"
    if isinstance(error, UpstreamRefused):
        return 502, "refused"
    return 502, "unreachable"


def error_for_status(peer: str, status: str, reason: str) -> GateError:
    """The GateError a non-200 answer from ``peer`` stands for (the inverse of ``answer_for``)."""
    text = f"via {peer}: {status} {reason}".rstrip()
    if status == "403":
        return RejectedByRule(text)
    if status == "504" or reason == "timeout":
        return UpstreamTimeout(text)
    if reason == "refused":
        return UpstreamRefused(text)
    return UpstreamUnreachable(text)


def _end_of(bridge: Bridge) -> StreamEnd:
    return stream_end(bridge.error, bridge.bytes_to_socket, bridge.bytes_to_stream)


class H2Stream:
    """One CONNECT stream of a session where we are the HTTP/2 server (``transport.Stream``)."""

    __slots__ = ("_bridge", "session", "stream_id")
    path = "h2"

    def __init__(self, session: Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self._bridge: Bridge | None = None

    @property
    def last_active(self) -> float:
        return self._bridge.last_active if self._bridge is not None else self.session.loop.time()

    def refuse(self, error: GateError) -> None:
        status, reason = answer_for(error)
        self.session.respond(self.stream_id, status, [(ERROR_HEADER, reason)], end=True)
        self.session.discard(self.stream_id)

    async def accept(self, upstream: socket.socket, on_end: Callable[[StreamEnd], None]) -> bool:
        bridge = self.session.bridges.get(self.stream_id)
        if bridge is not None:  # from here the bridge owns the upstream: a reset no longer cancels the serving
            bridge.on_abort = None
        self.session.respond(self.stream_id, 200)
        try:
            self._bridge = await self.session.attach(self.stream_id, upstream, lambda b: on_end(_end_of(b)))
        except ConnectionError as e:
            on_end(StreamEnd(Close.CLIENT_RESET, f"tunnel: {e}", 0, 0))
            return False
        return not self._bridge.closed

    def cancel(self, close: Close) -> None:
        self.session.reset(self.stream_id, h2.errors.ErrorCodes.CANCEL)
        if self._bridge is not None:
            self._bridge.abort(str(close))
        else:
            self.session.discard(self.stream_id)


# Serves a stream (who sent it, its peer entry, the flow or why it cannot be read, the stream) and
# returns how to give up on it: called with the reason when the stream is reset or its tunnel lost
# before it was bridged, so no upstream is dialled (or kept) for a stream nobody waits for.
Abandon = Callable[[str], None]
Serve = Callable[[str, PeerSpec | None, FlowMeta | GateError, Stream], Abandon]


def _abandoned(bridge: Bridge, abandon: Abandon) -> None:
    abandon(bridge.error or "stream reset")


def request_handler(trust: Trust, serve: Serve, exchanges: Mapping[str, Exchange] | None = None
                    ) -> RequestHandler:
    """The session callback for arriving CONNECT requests: who sent it (by the session's certificate,
    looked up once per session), the flow it carries, and the stream, handed to ``serve``. A request
    marked as an exchange (gate.mesh.h2_exchange: WebRTC signaling) goes to ``exchanges[kind]`` instead."""

    def on_request(session: Session, stream_id: int, headers: dict[str, str]) -> None:
        if session.peer is None:
            session.peer = trust.inbound_peer(session.peer_der)
        ident, peer = session.peer
        kind = headers.get(EXCHANGE_HEADER)
        if kind is not None:
            abandon = serve_exchange(ident, peer, H2Stream(session, stream_id),
                                     (exchanges or {}).get(kind))
            bridge = session.bridges.get(stream_id)
            if bridge is not None:
                bridge.on_abort = functools.partial(_abandoned, bridge, abandon)
            return
        meta: FlowMeta | GateError
        try:
            meta = meta_of(headers)
        except ClientProtocolError as e:
            meta = e
        abandon = serve(ident, peer, meta, H2Stream(session, stream_id))
        bridge = session.bridges.get(stream_id)
        if bridge is not None:
            bridge.on_abort = functools.partial(_abandoned, bridge, abandon)

    return on_request
