"""One flow's data channel bridged to a socket (the dialer's socketpair end, or the served upstream):
bytes both ways with backpressure, half-close, resets, and the far gate's answer (``ok`` / ``err``).

aiortc gives a receiver no flow control of its own (every message is handed over as it arrives), so the
channel carries a window: a sender has at most WINDOW bytes unacknowledged, and the receiver
acknowledges bytes only while its socket's write buffer is below its high-water mark. A slow reader thus
stops the sender, and a peer that sends past the window is cut (it cannot make us buffer more). On the
sending side, aiortc's ``bufferedAmount`` above BUFFER_HIGH also pauses the socket (resumed on
``bufferedamountlow``). See gate.mesh.webrtc.wire for the control messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from aiortc import RTCDataChannel
from aiortc.exceptions import InvalidStateError

from gate.errors import ClientProtocolError
from gate.mesh.bridge import abort_with_reset
from gate.mesh.transport import StreamEnd, stream_end
from gate.mesh.webrtc.wire import Ack, Control, Eof, Ok, Refused, parse_control

__all__ = ["BUFFER_HIGH", "CHUNK", "WINDOW", "ChannelBridge", "ChannelGone"]

# Unacknowledged bytes per channel: what the receiver may have to buffer for it (its early queue before
# the socket is attached, or its socket's write buffer); 4 MiB keeps a loopback transfer at full speed.
WINDOW = 4 << 20
ACK_EVERY = WINDOW // 4  # acknowledgements are batched: one control message per MiB
BUFFER_HIGH = 1 << 20  # aiortc's queued bytes for the channel above this pause reading the socket
CHUNK = 16 << 10  # bytes per message (until the link sets its own): under every stack's default maximum (64 KiB)
SOCKET_WRITE_HIGH = 1 << 20  # the socket's write buffer above this holds back acknowledgements


class ChannelGone(ConnectionError):
    """The channel closed before the far gate answered (it refused the channel, or the link was lost)."""


class ChannelBridge(asyncio.Protocol):
    """The socket side of one data channel (an asyncio protocol on the socket)."""

    def __init__(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.answered: asyncio.Future[Ok | Refused] = self.loop.create_future()
        self.early: list[bytes] = []  # bytes that came before the socket was attached (<= WINDOW)
        self.held = bytearray()  # read from our socket past the window (at most one read): sent as acks come
        self.eof_pending = False  # our socket said FIN; eof follows the held bytes
        self.sent = self.acked = 0  # bytes we sent on the channel / the peer acknowledged
        self.received = self.acked_back = 0  # bytes the peer sent us / we acknowledged
        self.unacked = 0  # written to the socket, not yet acknowledged
        self.local_ended = False  # we sent eof (our socket said FIN)
        self.remote_ended = False  # the peer sent eof (FIN written to our socket)
        self.reading_paused = self.write_paused = False
        self.bytes_to_socket = self.bytes_to_channel = 0
        self.last_active = self.loop.time()
        self.error: str | None = None
        self.closed = False
        self.on_closed: Callable[[ChannelBridge], None] | None = None
        self.on_abort: Callable[[], None] | None = None  # makes the socket's far end see a reset
        self.on_released: Callable[[ChannelBridge], None] | None = None  # the link stops counting it
        self.chunk = CHUNK  # bytes per message: the link's fit to its SCTP packets (sctp_tuning.message_size)
        channel.bufferedAmountLowThreshold = BUFFER_HIGH // 2
        channel.on("message", self._message)
        channel.on("close", self._channel_closed)
        channel.on("bufferedamountlow", self._maybe_resume)

    def end(self) -> StreamEnd:
        return stream_end(self.error, self.bytes_to_socket, self.bytes_to_channel)

    # -- asyncio.Protocol (the socket) ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.closed:
            self._reset_socket()
            return
        transport.set_write_buffer_limits(high=SOCKET_WRITE_HIGH)
        for data in self.early:
            self._write(data)
        self.early.clear()
        if self.remote_ended and transport.can_write_eof():
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        self.held += data
        self._pump()
        if (self.held or self.sent - self.acked >= WINDOW or self.channel.bufferedAmount > BUFFER_HIGH) \
                and not self.reading_paused and not self.closed:
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof_pending = True
        self._pump()
        return True  # keep the socket open for the other direction

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._acknowledge()

    def connection_lost(self, exc: Exception | None) -> None:
        if not (self.local_ended and self.remote_ended):  # the socket went away mid-flow
            self.error = self.error or (f"socket error: {exc}" if exc else "socket closed")
        self._finished()

    # -- the channel ------------------------------------------------------------------------------

    def _message(self, message: bytes | str) -> None:
        self.last_active = self.loop.time()
        if isinstance(message, bytes):
            self.received += len(message)
            if self.remote_ended or not self.answered.done():
                self.abort("peer sent data out of turn")
            elif self.received - self.acked_back > WINDOW:
                self.abort(f"peer sent past the window ({WINDOW} bytes)")
            elif self.transport is None:
                self.early.append(message)
            else:
                self._write(message)
            return
        try:
            control: Control = parse_control(message)
        except ClientProtocolError as e:
            self.abort(str(e))
            return
        if isinstance(control, Ok | Refused):
            if self.answered.done():
                self.abort("peer answered twice")
            else:
                self.answered.set_result(control)
        elif isinstance(control, Eof):
            self.remote_ended = True
            if self.transport is not None and not self.transport.is_closing() and self.transport.can_write_eof():
                self.transport.write_eof()
            self._close_if_done()
        elif isinstance(control, Ack):
            self.acked += control.count
            if self.acked > self.sent:
                self.abort("peer acknowledged bytes never sent")
            else:
                self._maybe_resume()

    def _channel_closed(self) -> None:
        if not self.answered.done():
            self.answered.set_exception(ChannelGone("channel closed before the answer"))
            self.answered.exception()  # retrieved: the dialer may have given up waiting
        if not (self.local_ended and self.remote_ended):
            self.abort("reset by peer")

    def _pump(self) -> None:
        """Send what the window admits of the held bytes, then the eof if our socket said FIN."""
        total = min(WINDOW - (self.sent - self.acked), len(self.held))
        if total > 0:
            with memoryview(self.held) as view:
                chunk = self.chunk
                for i in range(0, total, chunk):
                    if not self._send(bytes(view[i:min(i + chunk, total)])):
                        return  # aborted (held is cleared)
            del self.held[:total]
            self.sent += total
            self.bytes_to_channel += total
        if self.eof_pending and not self.held and not self.local_ended and self._send("eof"):
            self.local_ended = True
            self._close_if_done()

    def _maybe_resume(self) -> None:
        if self.closed:
            return
        self._pump()
        if (self.reading_paused and self.transport is not None and not self.held
                and self.sent - self.acked < WINDOW and self.channel.bufferedAmount <= BUFFER_HIGH):
            self.reading_paused = False
            self.transport.resume_reading()

    # -- helpers ----------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(data)
        self.bytes_to_socket += len(data)
        self.unacked += len(data)
        if self.unacked >= ACK_EVERY:
            self._acknowledge()

    def _acknowledge(self) -> None:
        if self.unacked and not self.write_paused and self._send(f"ack {self.unacked}"):
            self.acked_back += self.unacked
            self.unacked = 0

    def _send(self, data: bytes | str) -> bool:
        try:
            self.channel.send(data)
        except InvalidStateError:  # closed under us: its close event aborts the flow
            self.abort("channel closed")
            return False
        return True

    def send_control(self, text: str) -> None:
        self._send(text)

    def _close_if_done(self) -> None:
        if self.local_ended and self.remote_ended and self.transport is not None:
            self.transport.close()  # flushes what is buffered first; connection_lost closes the channel

    def abort(self, reason: str) -> None:
        """The channel was reset, the link lost, or the peer broke the protocol: reset the socket."""
        if self.closed:
            return
        self.error = self.error or reason
        self.local_ended = self.remote_ended = True
        self.early.clear()
        self.held = bytearray()  # (not clear(): _pump may hold a view of it)
        on_abort, self.on_abort = self.on_abort, None
        if on_abort is not None:
            on_abort()
        if self.transport is not None:
            self._reset_socket()  # connection_lost follows
        else:
            self._finished()

    def _reset_socket(self) -> None:
        assert self.transport is not None
        abort_with_reset(self.transport)

    def _finished(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.early.clear()
        self.held = bytearray()
        if not self.answered.done():
            self.answered.set_exception(ChannelGone(self.error or "closed"))
            self.answered.exception()
        self.channel.close()  # a stream reset, sent after what is queued (aiortc)
        self.channel.remove_all_listeners()
        if self.on_released is not None:
            self.on_released(self)
        if self.on_closed is not None:
            self.on_closed(self)

    def __repr__(self) -> str:
        return f"<ChannelBridge {self.channel.label[:40]!r} sent={self.sent} received={self.received}>"
