"""One HTTP/2 connection between two gates, and the bridges between its streams and TCP sockets.

The h2 library keeps the protocol state (sans-IO); this module is its asyncio shell. Each flow is one
CONNECT stream (RFC 9113 section 8.5) bridged to a socket:

- socket -> stream: bytes wait in the bridge's ``pending`` until the stream's and the connection's
  send windows admit them; above ``PENDING_HIGH`` the socket stops being read (backpressure), and so
  does a stream that cannot send while the connection's streams together hold over ``MAX_PENDING``.
- stream -> socket: DATA is written to the socket; its flow-control credit is given back only while
  the socket's write buffer is below its high-water mark, so a slow reader closes the sender's window.
  DATA that arrives before the socket is attached (the upstream is still connecting) is held and its
  credit returned only once it is written: the peer can send one window ahead, no more.
- a FIN becomes END_STREAM and END_STREAM a FIN (half-close both ways); an error or an abort becomes
  RST_STREAM, and RST_STREAM a TCP reset.

Windows and frames are large (MeshSpec.window, max_frame) since a flow here is usually a bulk
transfer over one long-lived connection.

A peer is trusted with flows, not with our memory (a trusted gate can be compromised; the limits follow
nginx's and Envoy's answers to CVE-2023-44487): what it can make us buffer is bounded by the windows
we advertise, by MAX_STREAMS, MAX_HEADER_LIST and MAX_HEADER_BLOCK (the encoded block, measured as its
frames arrive), by MAX_PENDING read ahead for it, by MAX_UNREAD_CONTROL answers it does not read, and
streams it resets before we answer them are counted (``ResetBudget``); past a limit the connection
ends with GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from gate.config import MeshSpec, PeerSpec
from gate.mesh.bridge import Bridge
from gate.mesh.datagrams import Channel
from gate.mesh.h2_limits import (
    CLOSE_LINGER,
    MAX_HEADER_BLOCK,
    MAX_HEADER_LIST,
    MAX_PENDING,
    MAX_STREAMS,
    MAX_UNREAD_CONTROL,
    PENDING_HIGH,
    HeaderBlockGuard,
    ResetBudget,
)

__all__ = ["ALPN_H2", "ALPN_REVERSE", "CONNECT_UDP", "Bridge", "Channel", "RequestHandler", "Session"]

log = logging.getLogger("ugate")

H2_MAX_DATA_CHUNK = 1 << 20  # DATA frames we send are cut at this size (frames are copied by h2)
RequestHandler = Callable[["Session", int, dict[str, str]], None]
CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
CONNECT_UDP = "connect-udp"  # the :protocol of an extended CONNECT carrying UDP (RFC 9298)
ALPN_H2, ALPN_REVERSE = "h2", "ugate-reverse"  # reverse: the TLS client serves the HTTP/2 streams


def _data_frame_repr(frame: hyperframe.frame.DataFrame) -> str:
    return f"data=<{len(frame.data)} bytes>"


# h2 traces every received frame with repr(frame), evaluated even when nothing logs it, and hyperframe's
# repr of a DATA frame copies and hex-encodes the whole payload: with MiB frames that was half of the
# receiving gate's CPU. Only the repr changes (it serves logging alone); h2 4.1 / hyperframe 6.
hyperframe.frame.DataFrame._body_repr = _data_frame_repr  # type: ignore[method-assign,assignment]


def _headers(raw: Any) -> dict[str, str]:
    """h2 hands headers as (name, value) pairs, str with header_encoding set (bytes otherwise)."""
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw}


class Session(asyncio.Protocol):
    """Either end of a gate-to-gate HTTP/2 connection over TLS."""

    def __init__(self, spec: MeshSpec, client_side: bool | None, on_request: RequestHandler | None = None,
                 on_lost: Callable[[Session], None] | None = None) -> None:
        """``client_side`` None: decided by the ALPN the TLS handshake settled (an accepted connection
        is the HTTP/2 server, unless the peer asked for a reverse tunnel)."""
        self.loop = asyncio.get_running_loop()
        self.spec = spec
        self.client_side = bool(client_side)
        self._role_by_alpn = client_side is None
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=self.client_side,
                                                                          header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.bridges: dict[int, Bridge] = {}
        self.responses: dict[int, asyncio.Future[dict[str, str]]] = {}
        self.write_paused = False
        self.closed = False
        self.peer_der: bytes | None = None  # the peer's certificate (DER)
        self.peer: tuple[str, PeerSpec | None] | None = None  # its gate ID and peer entry, once looked up
        self._on_request = on_request
        self.lost_callbacks: list[Callable[[Session], None]] = [on_lost] if on_lost is not None else []
        self.ready: asyncio.Future[None] = self.loop.create_future()  # the peer's SETTINGS arrived
        self.unread_control = 0  # answers queued while our writes are paused (MAX_UNREAD_CONTROL)
        self.resets = ResetBudget(self.loop.time())
        self.header_guard = HeaderBlockGuard(MAX_HEADER_BLOCK, server=True)
        self.pending = 0  # bytes in the bridges' ``pending`` (MAX_PENDING)
        self.over_budget = False  # pending went past MAX_PENDING and has not yet fallen to half

    # -- asyncio.Protocol (the TLS connection) ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        ssl_object = transport.get_extra_info("ssl_object")
        self.peer_der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if self._role_by_alpn and ssl_object is not None and ssl_object.selected_alpn_protocol() == ALPN_REVERSE:
            self.client_side = True
            self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                              header_encoding="utf-8"))
        self.header_guard = HeaderBlockGuard(MAX_HEADER_BLOCK, server=not self.client_side)
        self.conn.local_settings = h2.settings.Settings(client=self.client_side, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.spec.window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: self.spec.max_frame,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            # RFC 8441: the serving side accepts extended CONNECT (CONNECT-UDP streams)
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: int(not self.client_side),
        })  # in force at once (h2 treats initial values as acknowledged): the peer learns them below
        self.conn.max_inbound_frame_size = self.spec.max_frame  # h2 read these from the defaults at __init__
        self.conn.decoder.max_header_list_size = MAX_HEADER_LIST
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(self.spec.window - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.header_guard.feed(data):  # before h2 buffers it
            log.warning("mesh: peer sent a header block over %d bytes", self.header_guard.limit)
            self.abandon(CALM)
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.warning("mesh: HTTP/2 error from peer: %s", e)
            self.flush()
            self.close()
            return
        for event in events:
            self._dispatch(event)
            if self.closed:  # ended for abuse: the rest of the batch is not served
                return
        self.flush()
        if self.unread_control > MAX_UNREAD_CONTROL:
            log.warning("mesh: peer sent %d control frames without reading the answers", self.unread_control)
            self.abandon(CALM)

    def pause_writing(self) -> None:
        # Reading on is deliberate: a peer whose reads we stopped could stop ours in turn (both gates
        # sending bulk both ways would wait on each other for ever). What the peer makes us answer while
        # it does not read is counted instead (unread_control); DATA we send is bounded by the windows.
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.unread_control = 0
        for bridge in list(self.bridges.values()):
            self.drain(bridge)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"tunnel closed: {exc or 'by peer'}"))
            self.ready.exception()  # retrieved: nobody may be waiting for it
        for future in self.responses.values():
            if not future.done():
                future.set_exception(ConnectionError("tunnel closed before the answer"))
        self.responses.clear()
        for bridge in list(self.bridges.values()):
            bridge.abort("tunnel lost")
        for callback in self.lost_callbacks:
            callback(self)

    # -- events ----------------------------------------------------------------------------------

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, h2.events.DataReceived):
            bridge = self.bridges.get(event.stream_id)
            if bridge is not None:
                bridge.deliver(event.data, event.flow_controlled_length)
            else:
                self.acknowledge(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, h2.events.PingReceived):  # h2 queued the ACK
            self.unread_control += self.write_paused
        elif isinstance(event, h2.events.WindowUpdated):
            for bridge in ([self.bridges[event.stream_id]] if event.stream_id in self.bridges
                           else list(self.bridges.values()) if event.stream_id == 0 else []):
                self.drain(bridge)
        elif isinstance(event, h2.events.RemoteSettingsChanged):  # h2 queued the ACK
            self.unread_control += self.write_paused
            if not self.ready.done():
                self.ready.set_result(None)
            for bridge in list(self.bridges.values()):
                self.drain(bridge)
        elif isinstance(event, h2.events.StreamEnded):
            bridge = self.bridges.get(event.stream_id)
            if bridge is not None:
                bridge.remote_end()
        elif isinstance(event, h2.events.StreamReset):
            future = self.responses.pop(event.stream_id, None)
            if future is not None and not future.done():
                future.set_exception(ConnectionResetError(f"stream reset by peer ({event.error_code!r})"))
            bridge = self.bridges.get(event.stream_id)
            if bridge is not None:
                early = self._on_request is not None and not bridge.answered
                bridge.abort(f"reset by peer ({getattr(event.error_code, 'name', event.error_code)})")
                if early and self.resets.reset_early(self.loop.time()):
                    log.warning("mesh: peer reset %d of %d streams before they were answered (rapid reset)",
                                self.resets.early, self.resets.opened)
                    self.abandon(CALM)
        elif isinstance(event, h2.events.ResponseReceived):
            future = self.responses.pop(event.stream_id, None)
            if future is not None and not future.done():
                future.set_result(_headers(event.headers))
        elif isinstance(event, h2.events.RequestReceived):
            if self._on_request is None:
                self.reset(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                self.resets.open(self.loop.time())
                headers = _headers(event.headers)
                kind = Channel if headers.get(":protocol") == CONNECT_UDP else Bridge
                self.bridges[event.stream_id] = kind(self, event.stream_id)
                self._on_request(self, event.stream_id, headers)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close()

    # -- operations ------------------------------------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def open_stream(self, authority: str, headers: list[tuple[str, str]],
                    kind: type[Bridge] = Bridge) -> tuple[int, asyncio.Future[dict[str, str]]]:
        """Client side: send a CONNECT for ``authority``; the future gets the response headers. ``kind``
        Channel: an extended CONNECT (``headers`` carry its pseudo-headers) for CONNECT-UDP."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority), *headers])
        future: asyncio.Future[dict[str, str]] = self.loop.create_future()
        self.responses[stream_id] = future
        self.bridges[stream_id] = kind(self, stream_id)  # DATA may follow the answer at once
        self.flush()
        return stream_id, future

    def extended_connect(self) -> bool:
        """The peer announced SETTINGS_ENABLE_CONNECT_PROTOCOL (h2 does not check it before sending)."""
        return bool(self.conn.remote_settings.enable_connect_protocol)

    def respond(self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = (), end: bool = False) -> None:
        """Server side: answer a CONNECT (200 opens the tunnel; anything else ends the stream)."""
        try:
            self.conn.send_headers(stream_id, [(":status", str(status)), *headers], end_stream=end)
        except h2.exceptions.ProtocolError:  # the stream was reset, or the connection is ending (a GOAWAY
            return  # came while the upstream was dialled): connection_lost aborts what is left
        self.flush()

    async def attach(self, stream_id: int, sock: socket.socket,
                     on_closed: Callable[[Bridge], None] | None = None) -> Bridge:
        """Bridge the stream to ``sock``, which the bridge then owns (closed here if the stream is gone)."""
        bridge = self.bridges.get(stream_id)
        if bridge is None or bridge.closed:
            sock.close()
            raise ConnectionResetError("the stream ended before its socket was attached")
        bridge.on_closed = on_closed
        await self.loop.connect_accepted_socket(lambda: bridge, sock)
        return bridge

    def discard(self, stream_id: int) -> None:
        """Drop a stream that will not be bridged (refused, or its flow gave up): reset it if open."""
        self.responses.pop(stream_id, None)
        bridge = self.bridges.pop(stream_id, None)
        if bridge is not None:
            bridge.closed = True
        self.reset(stream_id, h2.errors.ErrorCodes.CANCEL)

    def drain(self, bridge: Bridge) -> None:
        """Send what the windows admit of the bridge's pending bytes; pause or resume its socket."""
        stream_id = bridge.stream_id
        if self.closed or bridge.local_ended:
            self.pending -= len(bridge.pending)
            bridge.pending.clear()
            return
        sent = False
        try:
            while bridge.pending and not self.write_paused:
                window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size,
                             H2_MAX_DATA_CHUNK)
                if window <= 0:
                    break
                chunk = bytes(bridge.pending[:window])
                del bridge.pending[:window]
                self.pending -= len(chunk)
                self.conn.send_data(stream_id, chunk)
                bridge.bytes_to_stream += len(chunk)
                sent = True
            if bridge.eof_pending and not bridge.pending:
                self.conn.end_stream(stream_id)
                bridge.local_ended = True
                sent = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            bridge.abort(f"stream closed: {e}")
            return
        if sent:
            self.flush()
        self._pace(bridge)
        self.rebalance()
        bridge.close_if_done()

    def rebalance(self) -> None:
        """Enter or leave the over-budget state (MAX_PENDING), pausing or resuming the bridges it holds."""
        if not self.over_budget and self.pending > MAX_PENDING:
            self.over_budget = True  # stop the streams that cannot send from reading more
            for other in list(self.bridges.values()):
                self._pace(other)
        elif self.over_budget and self.pending <= MAX_PENDING // 2:
            self.over_budget = False  # streams stopped only for the budget read again
            for other in list(self.bridges.values()):
                if other.reading_paused:
                    self._pace(other)

    def _pace(self, bridge: Bridge) -> None:
        """Pause or resume the bridge's socket by its own read-ahead and, over budget, the session's."""
        transport = bridge.transport
        if transport is None or transport.is_closing():
            return
        pending = len(bridge.pending)
        if bridge.reading_paused:
            if pending <= PENDING_HIGH // 2 and not (self.over_budget and self._blocked(bridge)):
                transport.resume_reading()
                bridge.reading_paused = False
        elif pending > PENDING_HIGH or (self.over_budget and self._blocked(bridge)):
            transport.pause_reading()
            bridge.reading_paused = True

    def _blocked(self, bridge: Bridge) -> bool:
        """The bridge cannot send what it reads now (bytes wait, or the windows are closed)."""
        if bridge.pending or self.write_paused:
            return True
        try:
            return self.conn.local_flow_control_window(bridge.stream_id) <= 0
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False

    def acknowledge(self, stream_id: int, credit: int) -> None:
        if credit and not self.closed:
            try:
                self.conn.acknowledge_received_data(credit, stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.increment_flow_control_window(credit)  # the connection's share still counts
            self.flush()

    def reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        if self.closed:
            return
        try:
            self.conn.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.unread_control += self.write_paused
        self.flush()

    def forget(self, stream_id: int) -> None:
        self.bridges.pop(stream_id, None)

    def close(self, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.conn.close_connection(code)
            except h2.exceptions.ProtocolError:
                pass  # h2 already sent its GOAWAY (a protocol error of the peer)
            self.flush()
            self.transport.close()
            # close() waits until every buffered byte is written; a peer that stops reading (or said
            # GOAWAY and went quiet) would keep this connection, and its buffers, for ever
            self.loop.call_later(CLOSE_LINGER, self.transport.abort)

    def abandon(self, code: h2.errors.ErrorCodes) -> None:
        """End the connection of a peer that broke a limit: GOAWAY, every stream aborted now, and the
        connection cut if the GOAWAY cannot leave within CLOSE_LINGER (a peer that does not read; see
        ``close``)."""
        if self.transport is None or self.closed:
            return
        self.close(code)
        self.closed = True  # nothing more is sent or served; connection_lost finishes the rest
        for bridge in list(self.bridges.values()):
            bridge.abort("tunnel closed for abuse")
