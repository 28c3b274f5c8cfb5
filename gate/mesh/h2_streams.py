"""HTTP/2 CONNECT streams as the mesh transport's streams: flow metadata as request headers, errors
as response statuses, and the serving side's ``Stream`` over a session's stream.

Everything here that knows HTTP/2 (stream ids, statuses, h2 error codes) stays here and in
gate.mesh.session; gate.mesh.inbound sees only ``transport.Stream`` and ``FlowMeta``.
"""

from __future__ import annotations

import functools
import socket
import urllib.parse
from collections.abc import Callable, Mapping

import h2.errors

from gate.addr import Endpoint, parse_endpoint
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
from gate.mesh.session import CONNECT_UDP, Bridge, Channel, RequestHandler, Session
from gate.mesh.transport import Datagrams, DatagramStream, Exchange, FlowMeta, Stream, StreamEnd, stream_end
from gate.mesh.trust import Trust

__all__ = ["ERROR_HEADER", "Abandon", "H2DatagramStream", "H2Stream", "Serve", "answer_for", "error_for_status",
           "meta_headers", "meta_of", "request_handler", "udp_headers", "udp_path", "udp_target"]

# The peer's reason for a failed CONNECT, in a response header, so the client's answer is exact
ERROR_HEADER = "ugate-error"
MAX_ALPN = 16  # offers carried; a TLS client offers a handful
UDP_PATH = "/.well-known/masque/udp/"  # RFC 9298's well-known URI template, before {host}/{port}/
IDLE_LINGER = 5.0  # seconds a CONNECT-UDP stream ended for idleness waits for the peer's END_STREAM
MAX_UDP_PATH = len(UDP_PATH) + 3 * 253 + 8  # the longest name, percent-encoded, a port and slashes


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


def udp_path(dst: Endpoint) -> str:
    """RFC 9298's default URI template path for ``dst`` (an IPv6 address's colons percent-encoded)."""
    return f"{UDP_PATH}{urllib.parse.quote(dst.host, safe='.-_')}/{dst.port}/"


def udp_target(path: str) -> Endpoint:
    """The destination in a CONNECT-UDP request's path; ClientProtocolError if it is not one."""
    if not path.startswith(UDP_PATH) or len(path) > MAX_UDP_PATH:
        raise ClientProtocolError(f"not a CONNECT-UDP path: {path[:64]!r}")
    parts = path[len(UDP_PATH):].split("/")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2]):
        raise ClientProtocolError(f"not a CONNECT-UDP path: {path[:64]!r}")
    host = urllib.parse.unquote(parts[0])
    try:
        return parse_endpoint(f"[{host}]:{parts[1]}" if ":" in host else f"{host}:{parts[1]}")
    except ValueError as e:
        raise ClientProtocolError(f"bad CONNECT-UDP target: {e}") from None


def udp_headers(authority: str, meta: FlowMeta) -> list[tuple[str, str]]:
    """An extended CONNECT's headers for ``meta``'s datagrams (RFC 9298: the target is in the path;
    ``authority``, the caller's, names the peer)."""
    return [(":scheme", "https"), (":path", udp_path(meta.dst)), (":protocol", CONNECT_UDP),
            ("capsule-protocol", "?1"), *meta_headers(meta)]


def meta_of(headers: dict[str, str]) -> FlowMeta:
    """The flow a CONNECT request carries (for CONNECT-UDP the destination is in the path);
    ClientProtocolError when it is not one we serve."""
    if headers.get(":method") != "CONNECT":
        raise ClientProtocolError("only CONNECT is served")
    protocol = headers.get(":protocol")
    if protocol is not None and protocol != CONNECT_UDP:
        raise ClientProtocolError(f"extended CONNECT for {protocol[:32]!r} is not served")
    if protocol is not None:
        dst = udp_target(headers.get(":path", ""))
    else:
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


class H2DatagramStream:
    """One CONNECT-UDP stream of a session where we are the HTTP/2 server (``transport.DatagramStream``)."""

    __slots__ = ("_channel", "session", "stream_id")
    path = "udp"

    def __init__(self, session: Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self._channel: Channel | None = None

    @property
    def last_active(self) -> float:
        return self._channel.last_active if self._channel is not None else self.session.loop.time()

    def refuse(self, error: GateError) -> None:
        status, reason = answer_for(error)
        self.session.respond(self.stream_id, status, [(ERROR_HEADER, reason)], end=True)
        self.session.discard(self.stream_id)

    def accept_datagrams(self, on_datagram: Callable[[bytes], None],
                         on_end: Callable[[StreamEnd], None]) -> Datagrams | None:
        channel = self.session.bridges.get(self.stream_id)
        if not isinstance(channel, Channel) or channel.closed:
            on_end(StreamEnd(Close.CLIENT_RESET, "stream reset before it was answered", 0, 0))
            return None
        channel.on_abort = None  # from here the channel's end ends the flow (on_closed)
        channel.on_closed = lambda c: on_end(_end_of(c))
        self.session.respond(self.stream_id, 200, [("capsule-protocol", "?1")])
        self._channel = channel
        channel.open(on_datagram)
        return None if channel.closed else channel

    def cancel(self, close: Close) -> None:
        channel = self._channel
        if close is Close.IDLE and channel is not None and not channel.closed:
            # a quiet UDP stream ends cleanly: the dialling gate drops it and opens another on the next
            # datagram, its session going on; a peer that does not end its side is cut after IDLE_LINGER
            channel.error = str(close)
            channel.close()
            self.session.loop.call_later(IDLE_LINGER, self._cut, channel, close)
            return
        self._cut(channel, close)

    def _cut(self, channel: Bridge | None, close: Close) -> None:
        if channel is not None and channel.closed:
            return
        self.session.reset(self.stream_id, h2.errors.ErrorCodes.CANCEL)
        channel = channel or self.session.bridges.get(self.stream_id)
        if channel is not None:
            channel.abort(str(close))
        else:
            self.session.discard(self.stream_id)


# Serves a stream (who sent it, its peer entry, the flow or why it cannot be read, the stream) and
# returns how to give up on it: called with the reason when the stream is reset or its tunnel lost
# before it was bridged, so no upstream is dialled (or kept) for a stream nobody waits for.
Abandon = Callable[[str], None]
Serve = Callable[[str, PeerSpec | None, FlowMeta | GateError, Stream | DatagramStream], Abandon]


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
            abandon = serve_exchange(trust.policy, ident, peer, headers, H2Stream(session, stream_id),
                                     exchanges or {})
            bridge = session.bridges.get(stream_id)
            if bridge is not None:
                bridge.on_abort = functools.partial(_abandoned, bridge, abandon)
            return
        meta: FlowMeta | GateError
        try:
            meta = meta_of(headers)
        except ClientProtocolError as e:
            meta = e
        stream = H2DatagramStream(session, stream_id) if headers.get(":protocol") == CONNECT_UDP \
            else H2Stream(session, stream_id)
        abandon = serve(ident, peer, meta, stream)
        bridge = session.bridges.get(stream_id)
        if bridge is not None:
            bridge.on_abort = functools.partial(_abandoned, bridge, abandon)

    return on_request
