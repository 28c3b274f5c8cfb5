"""The mesh transport interface: what the rest of the gate asks of a tunnel to a peer gate.

Two questions, whatever carries the bytes (HTTP/2 over mutual TLS today, WebRTC next):
- dialling: "open a stream to peer P carrying this flow" (``Transport.open_stream``), answered with a
  socket that looks like any upstream to the listener that asked;
- serving: "a stream arrived from peer P carrying this flow" (``gate.mesh.inbound.Inbound.serve``, given
  a ``Stream`` to refuse or to bridge to the upstream the gate opened; it returns what the transport
  calls if the stream ends before it is bridged, so nothing is dialled for a stream already gone).
UDP asks the same two questions with datagrams (``Transport.open_datagrams``, ``DatagramStream``): one
stream per destination, carrying whole datagrams rather than a byte stream.
``FlowMeta`` is what travels with each stream: every field routing may look at, so routes on the far
gate match exactly as they would here, and a hop count that bounds loops through the mesh.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gate.addr import Endpoint, is_ip
from gate.config import PeerSpec
from gate.errors import GateError
from gate.flow import MAX_HOPS, Close, Flow

__all__ = ["MAX_HOPS", "Alternative", "DatagramStream", "Datagrams", "Exchange", "Exchanged", "FlowMeta",
           "ServeStream", "Stream", "StreamEnd", "Transport", "stream_end"]



@dataclass(frozen=True, slots=True)
class FlowMeta:
    """A flow's facts as the far gate needs them."""

    dst: Endpoint
    client: Endpoint
    host: str | None = None  # the name asked for, or sniffed (SNI / HTTP Host)
    protocol: str | None = None
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    ech: bool = False
    hops: int = 1  # gates this flow crossed, counting the one it is arriving at

    @classmethod
    def of(cls, flow: Flow, dst: Endpoint | None = None) -> FlowMeta:
        """``dst``: one destination of a UDP session that sends to many (full-cone), else the flow's."""
        dst = dst or flow.dst
        assert dst is not None
        return cls(dst, flow.client, flow.host, flow.protocol, flow.sni, flow.alpn, flow.ech, flow.hops + 1)

    def flow(self, listener: str) -> Flow:
        """The flow as it starts on the serving gate (arriving on ``listener``)."""
        host = self.host if self.host is not None else (None if is_ip(self.dst.host) else self.dst.host.lower())
        return Flow(listener=listener, client=self.client, dst=self.dst, host=host, protocol=self.protocol,
                    sni=self.sni, alpn=self.alpn, ech=self.ech, hops=self.hops)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a served stream ended, in the access log's words, and what it carried."""

    close: Close
    detail: str | None
    bytes_in: int  # from the peer gate to our upstream
    bytes_out: int  # from our upstream back to the peer gate


def stream_end(error: str | None, bytes_in: int, bytes_out: int) -> StreamEnd:
    """How a served stream ended, from its bridge's error: None (clean), "idle timeout" / "shutdown"
    (we cut it), "socket ..." (our upstream broke), anything else (the peer reset it or was lost)."""
    if error is None:
        close, detail = Close.EOF, None
    elif error in ("idle timeout", "shutdown"):
        close, detail = Close(error), None
    elif error.startswith("socket"):
        close, detail = Close.UPSTREAM_RESET, error
    else:
        close, detail = Close.CLIENT_RESET, error
    return StreamEnd(close, detail, bytes_in, bytes_out)


class Stream(Protocol):
    """A stream a peer opened to us, as the serving side sees it."""

    path: str  # the access log's path of the flows it carries ("h2", "webrtc")

    @property
    def last_active(self) -> float:
        """Loop time a byte last moved either way (for the idle timeout)."""
        ...

    def refuse(self, error: GateError) -> None:
        """Answer the peer that the flow cannot be served, in the transport's terms."""
        ...

    async def accept(self, upstream: socket.socket, on_end: Callable[[StreamEnd], None]) -> bool:
        """Tell the peer the flow is connected and move bytes between the stream and ``upstream`` (owned
        by the stream from now on); ``on_end`` is called once when it ends. False if the stream was
        gone already (``on_end`` was called)."""
        ...

    def cancel(self, close: Close) -> None:
        """End the stream now (idle, shutdown): both the peer and the upstream see a reset."""
        ...


class Datagrams(Protocol):
    """One destination's datagrams through a tunnel (CONNECT-UDP), either side."""

    def send(self, payload: bytes | memoryview) -> bool:
        """Send one datagram; False when it was dropped (queue full, or the stream ended)."""
        ...

    def close(self) -> None:
        """End it cleanly; the far side ends in turn."""
        ...


@runtime_checkable
class DatagramStream(Protocol):
    """A UDP stream a peer opened to us (CONNECT-UDP, or a WebRTC channel), as the serving side sees it."""

    path: str  # the access log's path of the flows it carries ("udp": CONNECT-UDP, "webrtc-udp")

    @property
    def last_active(self) -> float: ...

    def refuse(self, error: GateError) -> None: ...

    def accept_datagrams(self, on_datagram: Callable[[bytes], None],
                         on_end: Callable[[StreamEnd], None]) -> Datagrams | None:
        """Tell the peer the flow is connected; its datagrams go to ``on_datagram`` from now on and
        ``on_end`` is called once when the stream ends. None if the stream was gone already (``on_end``
        was called)."""
        ...

    def cancel(self, close: Close) -> None: ...


class Transport(Protocol):
    """The dialling side of the mesh for one process."""

    def open_datagrams(self, peer: str, flow: Flow, dst: Endpoint, on_datagram: Callable[[bytes], None],
                       on_end: Callable[[GateError | None], None], timeout: float) -> Datagrams:
        """Datagrams of ``flow`` to ``dst`` through ``peer``, usable at once (queued, bounded, while the
        stream is set up); answers go to ``on_datagram``; ``on_end`` is called once when the stream ends
        or cannot be opened (None: the peer ended it cleanly; never called after ``close``)."""
        ...

    async def open_stream(self, peer: str, flow: Flow, timeout: float) -> socket.socket:
        """A socket carrying ``flow`` to its destination through ``peer``; a GateError if not."""
        ...

    def close(self) -> None: ...


# Serving a stream whatever carried it (gate.mesh.inbound.Inbound.serve): who sent it, its peer entry,
# the flow or why it cannot be read, the stream; returns what to call (with why) if the stream ends first.
ServeStream = Callable[[str, PeerSpec | None, "FlowMeta | GateError", Stream | DatagramStream], Callable[[str], None]]


@dataclass(frozen=True, slots=True)
class Exchanged:
    """Who sent an exchange (WebRTC signaling), as the transport authenticated it."""

    kind: str
    ident: str  # the gate at the other end of the connection, as its TLS certificate proved it
    peer: PeerSpec | None  # its entry here (None: a stranger)
    to: PeerSpec | None = None  # relaying: the peer of ours it asks us to pass the exchange on to
    # Relayed: the gate ``ident`` vouches sent it (what ``ident``'s TLS proved), and its entry here
    origin: str | None = None
    origin_peer: PeerSpec | None = None


# A request/answer exchange a peer sends over the mesh (WebRTC signaling): who sent it and the request
# body -> the answer body.
Exchange = Callable[[Exchanged, bytes], Awaitable[bytes]]


class Alternative(Protocol):
    """A transport tried before HTTP/2 for the peers whose ``transports`` list it first (WebRTC); it is
    signalled over HTTP/2 exchanges, so the HTTP/2 mesh (gate.mesh.dialer.Mesh) holds it."""

    async def open_stream(self, peer: str, flow: Flow, deadline: float) -> socket.socket | None:
        """As ``Transport.open_stream``; None: not used for this peer now (HTTP/2 carries the flow)."""
        ...

    async def open_datagrams(self, peer: str, meta: FlowMeta, on_datagram: Callable[[bytes], None],
                             on_end: Callable[[GateError | None], None], deadline: float) -> Datagrams | None:
        """Datagrams to ``meta.dst`` through ``peer``, ready to send; ``on_end`` as for
        ``Transport.open_datagrams``. None: not used for this peer now (CONNECT-UDP carries them)."""
        ...

    def exchange_for(self, serve: ServeStream) -> Exchange:
        """The exchange that answers this transport's signaling; the flows it then carries go to ``serve``."""
        ...

    def close(self) -> None: ...
