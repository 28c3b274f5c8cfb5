"""CONNECT-UDP streams (RFC 9298) on a mesh session: UDP payloads as DATAGRAM capsules in DATA frames.

``Channel`` is such a stream's end at the session, on either gate: the session drives it as it drives a
TCP ``Bridge`` (DATA in with its credit, windows, END_STREAM, resets, a lost tunnel), but the far side
is a callback per datagram, not a socket. ``DatagramFlow`` is what the dialling side hands a UDP
listener at once: datagrams queue (bounded) while the stream is set up, then go straight to it.

UDP is lossy by contract, so where TCP would push back, a datagram is dropped instead (``send`` says
False): a queue deeper than a few milliseconds of traffic only adds latency to every datagram after it.
"""

from __future__ import annotations

from collections.abc import Callable

import h2.errors

from gate.mesh.bridge import Bridge, Tunnel
from gate.mesh.capsules import CapsuleError, CapsuleReader, datagram_capsule, datagram_header
from gate.mesh.h2_limits import MAX_PENDING
from gate.mesh.transport import Datagrams

__all__ = ["MAX_QUEUED_BYTES", "MAX_STREAM_PENDING", "Channel", "DatagramFlow"]

# Capsule bytes one stream may have waiting for its send window (or for the stream's answer). 256 KiB
# is ~200 datagrams of 1,200 bytes; past it, datagrams are dropped as a full router queue drops them.
MAX_STREAM_PENDING = 256 << 10
# Payload bytes a DatagramFlow queues while its stream is set up (a QUIC client's first flight, a DNS
# retry or two); past it, datagrams are dropped.
MAX_QUEUED_BYTES = 64 << 10


class Channel(Bridge):
    """One CONNECT-UDP stream at its session. Datagrams the peer sends reach ``on_datagram`` once the
    channel is ``open``; before that their DATA is held with its credit (the peer can send at most the
    stream's window ahead). Credit is returned as capsules are consumed."""

    def __init__(self, session: Tunnel, stream_id: int) -> None:
        super().__init__(session, stream_id)
        self.reader = CapsuleReader()
        self.on_datagram: Callable[[bytes], None] | None = None
        self.queued: list[bytes] = []  # capsules sent before the stream was answered
        self.queued_bytes = 0
        self.dropped = 0  # datagrams not sent: the stream's queue was full
        self._answered = False
        self._drain_soon = False  # a drain is scheduled for the end of this loop iteration

    @property
    def answered(self) -> bool:
        return self._answered

    def open(self, on_datagram: Callable[[bytes], None]) -> None:
        """The stream was answered (200): deliver what the peer sent so far, send what we queued."""
        self._answered = True
        self.on_datagram = on_datagram
        early, self.early = self.early, []
        for data in early:
            if self.closed:
                return
            self._consume(data)
        if self.unacked and not self.closed:
            self.session.acknowledge(self.stream_id, self.unacked)
            self.unacked = 0
        queued, self.queued, self.queued_bytes = self.queued, [], 0
        for capsule in queued:
            self.pending += capsule
            self.session.pending += len(capsule)
        if queued:
            self.session.drain(self)

    def send(self, payload: bytes | memoryview) -> bool:
        """Send one datagram; False when it was dropped (the stream's queue is full, or it ended). The
        per-datagram path of every tunnelled UDP session: one header, two appends, no other copy."""
        if self.closed or self.local_ended or self.eof_pending:
            return False
        size = len(payload)
        if not self._answered:
            capsule = datagram_capsule(payload)
            if self.queued_bytes + len(capsule) > MAX_STREAM_PENDING:
                self.dropped += 1
                return False
            self.queued.append(capsule)
            self.queued_bytes += len(capsule)
            return True
        # under 16 KiB: a 2-byte length, built inline (RFC 9000 allows a longer varint than needed)
        head = bytes((0, 0x40 | ((size + 1) >> 8), (size + 1) & 0xFF, 0)) if size < 0x3FFE else datagram_header(size)
        session, pending, total = self.session, self.pending, len(head) + size
        if len(pending) + total > MAX_STREAM_PENDING or session.pending + total > MAX_PENDING:
            self.dropped += 1  # past the stream's queue, or the connection's read-ahead budget
            return False
        pending += head
        pending += payload
        session.pending += total
        if not self._drain_soon:  # once per loop iteration: a wake-up's datagrams leave in one DATA frame
            self._drain_soon = True
            session.loop.call_soon(self._drain)
        return True

    def _drain(self) -> None:
        self._drain_soon = False
        if not self.closed:
            self.last_active = self.session.loop.time()
            self.session.drain(self)

    def close(self) -> None:
        """End our side (END_STREAM after what is pending); the peer ends its side in turn."""
        if not self.closed and not self.eof_pending:
            self.eof_pending = True
            self.queued.clear()
            self.session.drain(self)

    # -- from the session -------------------------------------------------------------------------

    def deliver(self, data: bytes, credit: int) -> None:
        self.last_active = self.session.loop.time()
        if self.on_datagram is None:  # not answered yet: held, and so is its credit
            self.early.append(data)
            self.unacked += credit
            return
        self._consume(data)
        self.session.acknowledge(self.stream_id, credit)  # consumed (or dropped with the stream)

    def _consume(self, data: bytes) -> None:
        try:
            payloads = self.reader.feed(data)
        except CapsuleError as e:
            self.session.reset(self.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self.abort(f"bad capsule: {e}")
            return
        deliver = self.on_datagram
        for payload in payloads:
            if self.closed or deliver is None:
                return
            self.bytes_to_socket += len(payload)
            deliver(payload)

    def remote_end(self) -> None:
        """The peer ended its side: UDP has no half-close worth keeping, so ours ends too."""
        self.remote_ended = True
        if not self.local_ended:
            self.eof_pending = True
            self.session.drain(self)  # sends END_STREAM, then close_if_done
        else:
            self.close_if_done()

    def close_if_done(self) -> None:
        if self.local_ended and self.remote_ended:
            self._finished()

    def _finished(self) -> None:
        self.on_datagram = None
        self.queued.clear()
        super()._finished()


class DatagramFlow:
    """The dialling side's handle on one CONNECT-UDP stream, usable before the stream is answered:
    ``send`` queues up to MAX_QUEUED_BYTES until then; ``close`` ends it (or its setup)."""

    __slots__ = ("_cancel", "channel", "closed", "queue", "queued_bytes")

    def __init__(self) -> None:
        self.channel: Datagrams | None = None  # a CONNECT-UDP stream's Channel, or a WebRTC channel
        self.queue: list[bytes] = []
        self.queued_bytes = 0
        self.closed = False
        self._cancel: Callable[[], object] | None = None  # stops the setup

    def send(self, payload: bytes | memoryview) -> bool:
        """Send one datagram; False when it was dropped."""
        channel = self.channel
        if channel is not None:
            return channel.send(payload)
        if self.closed or self.queued_bytes + len(payload) > MAX_QUEUED_BYTES:
            return False
        self.queue.append(bytes(payload))
        self.queued_bytes += len(payload)
        return True

    def setup(self, cancel: Callable[[], object]) -> None:
        self._cancel = cancel

    def attach(self, channel: Datagrams) -> None:
        """The stream is answered (or, WebRTC, open): what was queued leaves now, in order."""
        self.channel = channel
        queue, self.queue, self.queued_bytes = self.queue, [], 0
        for payload in queue:
            channel.send(payload)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        if self.channel is not None:
            self.channel.close()
        elif self._cancel is not None:
            self._cancel()
