"""UDP flows over WebRTC: one data channel per (session, destination), unordered and never
retransmitted (a late datagram is worth less than a lost one), carrying one datagram per message.

``DatagramChannel`` is such a channel's end on either gate; ``ChannelDatagramStream`` is the serving
side's ``transport.DatagramStream``, so gate.mesh.inbound serves it exactly as a CONNECT-UDP stream (the
peer's allow list, the gate's routes, gate.mesh.udp_relay's connected socket). The dialling side opens
one with ``Link.open_datagrams``.

Answers travel as on a TCP flow's channel (``ok`` / ``err STATUS REASON``), but on an unreliable channel
either may be lost, so nothing waits for them: the dialling gate sends its datagrams as soon as the
channel is open, a datagram from the far side counts as its ``ok``, and a refusal is also a close of the
channel (which SCTP delivers reliably): closed before any answer reads as a failure, after one as the
far gate's clean end (its idle timeout), after which the next datagram opens another channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiortc import RTCDataChannel
from aiortc.exceptions import InvalidStateError

from gate.errors import ClientProtocolError, GateError, UpstreamUnreachable
from gate.flow import Close
from gate.mesh.h2_streams import answer_for, error_for_status
from gate.mesh.transport import Datagrams, StreamEnd, stream_end
from gate.mesh.webrtc.wire import Ok, Refused, parse_control

__all__ = ["MAX_BUFFERED", "MAX_DATAGRAM", "MAX_EARLY", "UDP_CHANNEL", "ChannelDatagramStream", "DatagramChannel",
           "end_error"]

log = logging.getLogger("ugate")

# The largest UDP payload (IPv6 without jumbograms; IPv4's is 65,507): a message over it is no datagram
# any socket could have sent or could send on, so it is dropped and counted.
MAX_DATAGRAM = 65527
# Bytes aiortc holds queued for one channel (``bufferedAmount``); past it datagrams are dropped, as a full
# router queue drops them. aiortc's send queue is shared by every channel of the connection, so this also
# bounds how long one flow's burst can hold back the others: 256 KiB is ~200 datagrams of 1,200 bytes.
MAX_BUFFERED = 256 << 10
# Bytes the serving side holds for a channel whose upstream socket is not open yet (a first flight, a
# DNS retry or two, as CONNECT-UDP's MAX_QUEUED_BYTES on the dialling side); past it, dropped.
MAX_EARLY = 64 << 10
# RTCPeerConnection.createDataChannel's parameters for a UDP flow: unordered, no retransmissions.
UDP_CHANNEL: dict[str, Any] = {"ordered": False, "maxRetransmits": 0}


class DatagramChannel:
    """One UDP flow's data channel, either gate: datagrams as binary messages (``Datagrams``)."""

    __slots__ = ("answer", "bytes_in", "bytes_out", "channel", "closed", "dropped", "early", "early_bytes", "error",
                 "last_active", "local_close", "loop", "on_abort", "on_closed", "on_datagram", "on_released")

    def __init__(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        self.loop = asyncio.get_running_loop()
        self.on_datagram: Callable[[bytes], None] | None = None  # None: held in ``early`` (serving, not accepted)
        self.early: list[bytes] = []
        self.early_bytes = 0
        self.answer: Ok | Refused | None = None  # the far gate's (the serving side's own is Ok at once)
        self.dropped: Counter[str] = Counter()  # why datagrams were dropped: too_big, queue_full, early
        self.bytes_in = self.bytes_out = 0  # datagram bytes from the channel / sent on it
        self.last_active = self.loop.time()
        self.error: str | None = None  # why it ended, if not cleanly
        self.closed = False
        self.local_close = False  # ended by our ``close``
        self.on_closed: Callable[[DatagramChannel], None] | None = None
        self.on_released: Callable[[DatagramChannel], None] | None = None  # the link stops counting it
        self.on_abort: Callable[[], None] | None = None  # serving: gives up a setup not done yet
        channel.on("message", self._message)
        channel.on("close", self._channel_closed)

    # -- Datagrams --------------------------------------------------------------------------------

    def send(self, payload: bytes | memoryview) -> bool:
        """Send one datagram; False when it was dropped (too big, aiortc's queue full, or ended)."""
        if self.closed:
            return False
        size = len(payload)
        if size > MAX_DATAGRAM:
            self.dropped["too_big"] += 1
            return False
        if self.channel.bufferedAmount + size > MAX_BUFFERED:
            self.dropped["queue_full"] += 1
            return False
        try:
            self.channel.send(bytes(payload))  # a copy: aiortc queues what it is given, callers reuse buffers
        except InvalidStateError:  # closed under us: its close event ends the flow
            return False
        except ValueError:  # over the peer's a=max-message-size (another stack may announce less)
            self.dropped["too_big"] += 1
            return False
        self.bytes_out += size
        self.last_active = self.loop.time()
        return True

    def close(self) -> None:
        """End it cleanly (the channel is reset; the peer sees it closed)."""
        if not self.closed:
            self.local_close = True
        self._finished()

    # -- the channel ------------------------------------------------------------------------------

    def _message(self, message: bytes | str) -> None:
        self.last_active = self.loop.time()
        if isinstance(message, str):
            self._control(message)
            return
        if len(message) > MAX_DATAGRAM:
            self.dropped["too_big"] += 1
            if self.dropped["too_big"] == 1:
                log.warning("webrtc udp: %s: a message of %d bytes is no datagram: dropped", self.label, len(message))
            return
        deliver = self.on_datagram
        if deliver is None:
            if self.closed or self.early_bytes + len(message) > MAX_EARLY:
                self.dropped["early"] += 1
                return
            self.early.append(message)
            self.early_bytes += len(message)
            return
        if self.answer is None:
            self.answer = Ok()  # the far gate answers: its ok may have been lost (unreliable channel)
        self.bytes_in += len(message)
        deliver(message)

    def _control(self, text: str) -> None:
        try:
            control = parse_control(text)
        except ClientProtocolError as e:
            self.abort(str(e))
            return
        if not isinstance(control, Ok | Refused):
            self.abort(f"{text[:16]!r} on a UDP channel")
        elif self.answer is not None and not (isinstance(self.answer, Ok) and isinstance(control, Ok)):
            self.abort("peer answered twice")  # (an ok after a datagram stood for it is the same answer)
        else:
            self.answer = control

    def _channel_closed(self) -> None:
        """The peer closed the channel: the end of a UDP flow (it has no half-close), or its refusal; or
        the whole connection went (aiortc closes every channel as its SCTP association ends)."""
        if self.channel.transport.state == "closed":
            self.abort("connection closed")
            return
        self._give_up()
        self._finished()

    def open(self, on_datagram: Callable[[bytes], None]) -> None:
        """Datagrams go to ``on_datagram`` from now on, those held first."""
        self.on_datagram = on_datagram
        early, self.early, self.early_bytes = self.early, [], 0
        for message in early:
            if self.closed:
                return
            self.bytes_in += len(message)
            on_datagram(message)

    def send_control(self, text: str) -> None:
        try:
            self.channel.send(text)
        except InvalidStateError:
            pass  # closed already: its close event ends the flow

    def abort(self, reason: str) -> None:
        """End it for ``reason`` (the link was lost, the peer broke the protocol, we cut it)."""
        if self.closed:
            return
        self.error = self.error or reason
        self._give_up()
        self._finished()

    def _give_up(self) -> None:
        on_abort, self.on_abort = self.on_abort, None
        if on_abort is not None:
            on_abort()

    def _finished(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.on_datagram = None
        self.early.clear()
        self.channel.close()  # a stream reset, after what aiortc has queued
        self.channel.remove_all_listeners()
        if self.dropped:
            log.debug("webrtc udp: %s ended; dropped %s", self.label, dict(self.dropped))
        if self.on_released is not None:
            self.on_released(self)
        if self.on_closed is not None:
            self.on_closed(self)

    @property
    def label(self) -> str:
        return self.channel.label[:80]

    def __repr__(self) -> str:
        return f"<DatagramChannel {self.label!r} in={self.bytes_in} out={self.bytes_out}>"


def end_error(peer: str, datagrams: DatagramChannel) -> GateError | None:
    """What the dialling side's ``on_end`` is told when the channel ended: None for the far gate's clean
    end (after it answered), else the refusal or the failure."""
    answer = datagrams.answer
    if isinstance(answer, Refused):
        return error_for_status(peer, answer.status, answer.reason)
    if datagrams.error is not None:
        return UpstreamUnreachable(f"via {peer} (webrtc): {datagrams.error}")
    if answer is None:
        return UpstreamUnreachable(f"via {peer} (webrtc): the channel closed before the answer")
    return None


class ChannelDatagramStream:
    """A UDP flow's channel a peer opened to us (``transport.DatagramStream``)."""

    __slots__ = ("datagrams",)
    path = "webrtc-udp"

    def __init__(self, datagrams: DatagramChannel) -> None:
        self.datagrams = datagrams
        datagrams.answer = Ok()  # we answer; the peer sends none

    @property
    def last_active(self) -> float:
        return self.datagrams.last_active

    def refuse(self, error: GateError) -> None:
        status, reason = answer_for(error)
        self.datagrams.send_control(f"err {status} {reason}")
        self.datagrams.on_abort = None
        self.datagrams.close()  # the close tells it too, should the answer be lost

    def accept_datagrams(self, on_datagram: Callable[[bytes], None],
                         on_end: Callable[[StreamEnd], None]) -> Datagrams | None:
        datagrams = self.datagrams
        datagrams.on_abort = None  # from here its end ends the flow (on_closed)
        if datagrams.closed:
            on_end(StreamEnd(Close.CLIENT_RESET, datagrams.error or "channel closed before it was answered", 0, 0))
            return None
        datagrams.on_closed = lambda d: on_end(stream_end(d.error, d.bytes_in, d.bytes_out))
        datagrams.send_control("ok")
        datagrams.open(on_datagram)
        return None if datagrams.closed else datagrams

    def cancel(self, close: Close) -> None:
        self.datagrams.abort(str(close))
