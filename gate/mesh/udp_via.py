"""A UDP session routed ``via`` a mesh peer, for any UDP listener: one tunnel per destination it sends to
(a full-cone session sends to many), opened on the first datagram to it: an unordered WebRTC data channel
where the peer's transports start with webrtc, else (or when WebRTC is down) a CONNECT-UDP stream; the
transport (gate.mesh.dialer.Mesh.open_datagrams) chooses, this session only sees ``Datagrams``.

The listener sets ``on_datagram`` (answers, with the destination they come from: the stream's) and
``on_end`` (a stream failed or its tunnel broke: the whole session ends, so the client's next datagram
is routed afresh) before its first ``send``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from gate.addr import Endpoint
from gate.errors import GateError
from gate.flow import Flow
from gate.mesh.transport import Datagrams, Transport

__all__ = ["MAX_DESTINATIONS", "ViaUdp"]

# Streams one session may hold open (one per destination), when its listener gives no cap of its own:
# each costs the peer a socket and a stream of its MAX_STREAMS.
MAX_DESTINATIONS = 64


class ViaUdp:
    """A UDP session's datagrams through ``peer``, one tunnel per destination."""

    __slots__ = ("closed", "dropped", "flow", "max_destinations", "on_datagram", "on_end", "peer", "streams",
                 "timeout", "transport")

    def __init__(self, transport: Transport, peer: str, flow: Flow, timeout: float,
                 max_destinations: int = MAX_DESTINATIONS) -> None:
        self.transport = transport
        self.peer = peer
        self.flow = flow
        self.timeout = timeout
        self.max_destinations = max_destinations
        self.streams: dict[Endpoint, Datagrams] = {}
        self.on_datagram: Callable[[Endpoint, bytes], None] | None = None
        self.on_end: Callable[[GateError | None], None] | None = None
        self.closed = False
        self.dropped = 0  # datagrams to a destination over max_destinations, or not queued

    def stream(self, dst: Endpoint) -> Datagrams | None:
        """The stream to ``dst``, opened now if there is none; None past ``max_destinations`` or closed.
        A listener relaying a batch to one destination looks it up once for the batch."""
        stream = self.streams.get(dst)
        if stream is None:
            if self.closed or len(self.streams) >= self.max_destinations:
                return None
            stream = self.streams[dst] = self.transport.open_datagrams(
                self.peer, self.flow, dst, functools.partial(self._answer, dst),
                functools.partial(self._ended, dst), self.timeout)
        return stream

    def send(self, dst: Endpoint, payload: bytes | memoryview) -> bool:
        """Send one datagram to ``dst``; False when it was dropped."""
        stream = self.stream(dst)
        if stream is not None and stream.send(payload):
            return True
        self.dropped += 1
        return False

    def _answer(self, dst: Endpoint, payload: bytes) -> None:
        if self.on_datagram is not None and not self.closed:  # answers in flight when it closed are dropped
            self.on_datagram(dst, payload)

    def _ended(self, dst: Endpoint, error: GateError | None) -> None:
        self.streams.pop(dst, None)
        if error is None or self.closed:  # the peer ended it (its idle timeout): the next datagram reopens
            return
        self.close()
        if self.on_end is not None:
            self.on_end(error)

    def close(self) -> None:
        self.closed = True
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.close()
