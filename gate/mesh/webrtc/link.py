"""One RTCPeerConnection to a peer gate (in one direction: the offering gate opens the flows' channels,
the answering gate serves them), its flow channels (TCP flows' and UDP flows': gate.mesh.webrtc.udp), and
the bound on how many it carries.

aiortc's objects stay in this package: the rest of the gate sees sockets (dialling) and
``transport.Stream`` (serving), as with the HTTP/2 transport.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable
from typing import TypeVar

from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection

from gate.addr import Endpoint
from gate.config import PeerSpec
from gate.errors import GateError, UpstreamTimeout, UpstreamUnreachable
from gate.flow import Close
from gate.mesh.dialer import reset_on_close
from gate.mesh.h2_streams import answer_for, error_for_status
from gate.mesh.transport import FlowMeta, ServeStream, StreamEnd
from gate.mesh.webrtc import sctp_tuning
from gate.mesh.webrtc.channel import ChannelBridge, ChannelGone
from gate.mesh.webrtc.udp import UDP_CHANNEL, ChannelDatagramStream, DatagramChannel, end_error
from gate.mesh.webrtc.wire import Ok, label_of, parse_label

__all__ = ["CONTROL_LABEL", "MAX_CHANNELS", "ChannelStream", "Link", "TransportDown", "closed_all",
           "new_peer_connection"]

log = logging.getLogger("ugate")

# Flow channels one peer connection carries at once, TCP and UDP together, as the HTTP/2 transport's
# MAX_STREAMS: a peer that opens more has them closed at once (each open channel holds a bridge, and an
# upstream once served).
MAX_CHANNELS = 1000
# A channel is open once the peer's SCTP stack acknowledged it (one round trip): a connection where that
# takes longer is taken for dead (a peer that restarted leaves ours unaware until ICE consent lapses,
# about 30 s), closed, and the flow falls back. At most half the flow's budget, so the fallback has time.
CHANNEL_OPEN_TIMEOUT = 3.0
# The channel an offer opens so that it has a data section; never carries a flow. Both gates announce on it
# the largest SCTP packet they receive (gate.mesh.webrtc.sctp_tuning): large packets need both announcements.
CONTROL_LABEL = "ugate"


def new_peer_connection(stun: tuple[Endpoint, ...] = ()) -> RTCPeerConnection:
    """A peer connection gathering host candidates, and server-reflexive ones through the configured
    STUN servers (``mesh.stun``: e.g. a public gate's ``stun`` listener). aiortc's default ICE server
    is a public STUN server, which a gate must never contact unasked: none configured means none."""
    servers = [RTCIceServer(urls=f"stun:{s.host}:{s.port}" if ":" not in s.host else f"stun:[{s.host}]:{s.port}")
               for s in stun]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


_Tracked = TypeVar("_Tracked", ChannelBridge, DatagramChannel)


class TransportDown(UpstreamUnreachable):
    """WebRTC could not connect to the peer (signaling refused, ICE or DTLS failed): try the next transport."""


class ChannelStream:
    """A flow channel a peer opened to us (``transport.Stream``)."""

    __slots__ = ("bridge",)
    path = "webrtc"

    def __init__(self, bridge: ChannelBridge) -> None:
        self.bridge = bridge
        bridge.answered.set_result(Ok())  # we answer; the peer sends none

    @property
    def last_active(self) -> float:
        return self.bridge.last_active

    def refuse(self, error: GateError) -> None:
        status, reason = answer_for(error)
        self.bridge.send_control(f"err {status} {reason}")
        self.bridge.on_abort = None
        self.bridge.local_ended = self.bridge.remote_ended = True  # a clean end: the answer, then the close
        self.bridge.abort("refused")

    async def accept(self, upstream: socket.socket, on_end: Callable[[StreamEnd], None]) -> bool:
        bridge = self.bridge
        bridge.on_abort = None  # from here the bridge owns the upstream: a reset no longer cancels the serving
        if bridge.closed:
            upstream.close()
            on_end(StreamEnd(Close.CLIENT_RESET, bridge.error or "channel closed", 0, 0))
            return False
        bridge.on_closed = lambda b: on_end(b.end())
        bridge.send_control("ok")
        await asyncio.get_running_loop().connect_accepted_socket(lambda: bridge, upstream)
        return not bridge.closed

    def cancel(self, close: Close) -> None:
        self.bridge.abort(str(close))


class Link:
    """A peer connection and the flow channels on it."""

    def __init__(self, peer: str, pc: RTCPeerConnection) -> None:
        self.peer = peer
        self.pc = pc
        self.loop = asyncio.get_running_loop()
        self.bridges: set[ChannelBridge | DatagramChannel] = set()
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.closed = False
        self.refused_channels = 0  # channels closed at once for MAX_CHANNELS
        self.control: RTCDataChannel | None = None  # the offer's channel (one; more are closed)
        self.announced = False  # we told the peer the packet size we receive
        self.peer_announced = False  # the peer told us its (later announcements are ignored)
        self.message_size = sctp_tuning.message_size(sctp_tuning.STANDARD_PACKET)  # per flow message
        self.on_lost: Callable[[Link], None] | None = None
        pc.on("connectionstatechange", self._state_changed)

    def _state_changed(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and not self.connected.done():
            sctp_tuning.tune(self.pc)  # before the announcement: from then on we receive large packets
            self._announce()
            self.connected.set_result(None)
        elif state in ("failed", "closed"):
            self.close(f"peer connection {state}")

    async def wait_connected(self, timeout: float) -> None:
        """Until ICE and DTLS are done; TransportDown if they fail or take over ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.connected)
        except TimeoutError:
            self.close("ICE/DTLS not connected in time")
            raise TransportDown(f"webrtc to {self.peer}: not connected within {timeout:g}s") from None
        except ConnectionError as e:
            raise TransportDown(f"webrtc to {self.peer}: {e}") from None

    # -- the control channel: packet sizes ---------------------------------------------------------

    def offer_control(self) -> None:
        """Open the control channel (the offering gate, before its offer: it gives the offer its data section)."""
        channel = self.pc.createDataChannel(CONTROL_LABEL)
        channel.on("open", functools.partial(self._control_open, channel))

    def _control_open(self, channel: RTCDataChannel) -> None:
        if self.control is not None:
            channel.close()
            return
        self.control = channel  # kept open (closing it would be a stream reset for nothing)
        channel.on("message", self._control_message)
        self._announce()

    def _announce(self) -> None:
        control = self.control
        if self.announced or control is None or control.readyState != "open" or not sctp_tuning.tuned(self.pc):
            return
        self.announced = True
        control.send(sctp_tuning.announcement(sctp_tuning.receive_limit(self.pc)))

    def _control_message(self, message: bytes | str) -> None:
        try:
            if not isinstance(message, str):
                raise sctp_tuning.BadAnnouncement("binary message on the control channel")
            announced = sctp_tuning.parse_announcement(message)
        except sctp_tuning.BadAnnouncement as e:
            log.warning("webrtc: peer %s: %s", self.peer, e)
            self.close(f"control channel: {e}")
            return
        if self.peer_announced:
            return  # once per connection: a peer repeating itself changes nothing (nor fills the log)
        self.peer_announced = True
        packet = sctp_tuning.use_packet(self.pc, announced.packet)
        self.message_size = sctp_tuning.message_size(packet)
        for bridge in self.bridges:
            if isinstance(bridge, ChannelBridge):  # (a UDP channel sends each datagram as it is)
                bridge.chunk = self.message_size
        log.info("webrtc: peer %s receives %d-byte SCTP packets: sending %d-byte packets", self.peer,
                 announced.packet, packet)

    # -- dialling: a flow over a new channel -----------------------------------------------------

    async def open_flow(self, meta: FlowMeta, deadline: float) -> socket.socket:
        """A socket carrying the flow ``meta`` over a new channel; GateError (TransportDown if the
        connection itself is gone) if not."""
        self._check_room()
        channel = self.pc.createDataChannel(label_of(meta), ordered=True)
        bridge = self._track(ChannelBridge(channel))
        await self._opened(channel, bridge.abort, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                answer = await bridge.answered
        except TimeoutError:
            bridge.abort("no answer")
            raise UpstreamTimeout(f"via {self.peer} (webrtc): no answer in time") from None
        except ChannelGone as e:
            raise TransportDown(f"via {self.peer} (webrtc): {e}") from None
        if not isinstance(answer, Ok):
            bridge.local_ended = bridge.remote_ended = True
            bridge.abort("refused")
            raise error_for_status(self.peer, answer.status, answer.reason)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        bridge.on_abort = functools.partial(reset_on_close, ours)
        try:
            await self.loop.connect_accepted_socket(lambda: bridge, theirs)
        except BaseException:
            ours.close()
            theirs.close()
            bridge.abort("attach failed")
            raise
        return ours

    async def open_datagrams(self, meta: FlowMeta, on_datagram: Callable[[bytes], None],
                             on_end: Callable[[GateError | None], None], deadline: float) -> DatagramChannel:
        """An open channel (unordered, no retransmissions) for the UDP flow ``meta``, its datagrams going
        to ``on_datagram``; ``on_end`` is called once when it ends (not after its ``close``).
        TransportDown if the connection cannot carry it. Nothing waits for the far gate's answer: see
        gate.mesh.webrtc.udp."""
        self._check_room()
        datagrams = self._track(DatagramChannel(self.pc.createDataChannel(label_of(meta, udp=True), **UDP_CHANNEL)))
        datagrams.on_datagram = on_datagram
        await self._opened(datagrams.channel, datagrams.abort, deadline)
        if datagrams.closed:
            raise TransportDown(f"webrtc to {self.peer}: the channel closed as it opened")
        datagrams.on_closed = lambda d: None if d.local_close else on_end(end_error(self.peer, d))
        return datagrams

    def _check_room(self) -> None:
        if self.closed:
            raise TransportDown(f"webrtc to {self.peer}: connection closed")
        if len(self.bridges) >= MAX_CHANNELS:
            raise TransportDown(f"webrtc to {self.peer}: {MAX_CHANNELS} flows open")

    async def _opened(self, channel: RTCDataChannel, abort: Callable[[str], None], deadline: float) -> None:
        """Until the peer acknowledged ``channel`` (``abort``: its flow's end if not)."""
        opened = asyncio.Event()
        channel.on("open", opened.set)
        try:
            async with asyncio.timeout(min(CHANNEL_OPEN_TIMEOUT, (deadline - self.loop.time()) / 2)):
                await opened.wait()
        except TimeoutError:
            abort("not opened")
            self.close("a channel was not acknowledged in time")
            raise TransportDown(f"webrtc to {self.peer}: the connection does not answer") from None

    # -- serving: channels the peer opens ----------------------------------------------------------

    def serve_with(self, ident: str, peer: PeerSpec, serve: ServeStream) -> None:
        """Channels the peer opens from now on carry flows to ``serve``."""
        self.pc.on("datachannel", functools.partial(self._arrived, ident, peer, serve))

    def _arrived(self, ident: str, peer: PeerSpec, serve: ServeStream, channel: RTCDataChannel) -> None:
        if channel.label == CONTROL_LABEL and self.control is None:
            self._control_open(channel)
            return
        if len(self.bridges) >= MAX_CHANNELS:
            self.refused_channels += 1
            if self.refused_channels in (1, 1000):
                log.warning("webrtc: peer %s opened over %d channels: closing the new ones", self.peer, MAX_CHANNELS)
            channel.close()
            return
        meta: FlowMeta | GateError
        udp = False
        try:
            meta, udp = parse_label(channel.label)
        except GateError as e:
            meta = e
        if udp:
            datagrams = self._track(DatagramChannel(channel))
            abandon = serve(ident, peer, meta, ChannelDatagramStream(datagrams))
            if not datagrams.closed:
                datagrams.on_abort = functools.partial(abandon, "channel reset")
            return
        bridge = self._track(ChannelBridge(channel))
        abandon = serve(ident, peer, meta, ChannelStream(bridge))
        if not bridge.closed:
            bridge.on_abort = functools.partial(abandon, "channel reset")

    def _track(self, bridge: _Tracked) -> _Tracked:
        if isinstance(bridge, ChannelBridge):
            bridge.chunk = self.message_size
        self.bridges.add(bridge)
        bridge.on_released = self.bridges.discard
        return bridge

    # -- the end ----------------------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(reason))
            self.connected.exception()
        for bridge in list(self.bridges):
            bridge.abort(f"webrtc: {reason}")
        self.bridges.clear()
        task = self.loop.create_task(self.pc.close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        if self.on_lost is not None:
            self.on_lost(self)



_closing: set[asyncio.Task[None]] = set()  # peer connections being closed (aiortc's close is a coroutine)


async def closed_all() -> None:
    """Until every peer connection closed so far has let go of its sockets."""
    while _closing:
        await asyncio.gather(*_closing, return_exceptions=True)
