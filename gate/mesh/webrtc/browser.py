"""Browser peers: peer connections answered for offers a browser POSTs to a ``webrtc_signal`` listener,
and their data channels as TCP flows. A channel labelled ``tcp:HOST:PORT`` becomes a socket handed to
the gate's flow core (routes, policy, dial, relay, access log), exactly as an accepted client would be.

A browser speaks no ugate protocol: binary or text messages are the bytes (text as UTF-8), closing
the channel ends the flow (the upstream gets a FIN, as after a client's shutdown(SHUT_WR)), and when
the upstream ends the channel is closed after the bytes queued on it. A refused flow (a ``reject``
route, an unreachable upstream) is a closed channel. The pure pieces (offer bodies, labels) are at the
top; the connection bookkeeping and its bounds below.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidStateError

from gate.addr import Endpoint, parse_endpoint
from gate.errors import ClientProtocolError
from gate.mesh.bridge import abort_with_reset
from gate.mesh.dialer import reset_on_close
from gate.mesh.webrtc.link import MAX_CHANNELS, new_peer_connection
from gate.mesh.webrtc.wire import SignalError, check_sdp

__all__ = ["BUFFER_HIGH", "CHUNK", "END_LINGER", "LABEL_PREFIX", "MAX_EARLY", "MAX_UPLOAD_BUFFER", "BrowserChannel",
           "BrowserLimits", "BrowserPeers", "PeersFull", "answer_body", "offer_of", "target_of_label"]

log = logging.getLogger("ugate")

LABEL_PREFIX = "tcp:"
MAX_LABEL = 300  # "tcp:" + a 253-character name + ":65535", and brackets for IPv6
CHUNK = 16 << 10  # bytes per message: under every browser's maximum message size (Firefox's 64 KiB is the least)
BUFFER_HIGH = 1 << 20  # aiortc's bytes queued for the browser above this pause reading the upstream
# A browser cannot be told to slow down (aiortc hands over every message as it arrives, and its SCTP
# window does not shrink for a slow reader), so what it sends past a slow upstream is buffered in our
# socket: past this the flow is cut. A page pacing its sends on bufferedAmount stays far below it.
MAX_UPLOAD_BUFFER = 8 << 20
# Seconds an upstream has, once the browser closed the channel, to see the end and close (what it still
# says is dropped): past it the flow is reset, so a browser that went away (its whole peer connection
# closed, which closes every channel) holds no descriptors until the idle timeout.
END_LINGER = 10.0
MAX_EARLY = 1 << 20  # bytes that arrive before the channel's socket is attached (a few ms): past it, cut


# -- pure codecs ------------------------------------------------------------------------------------

def offer_of(body: bytes, content_type: str) -> tuple[str, bool]:
    """The SDP of an offer POSTed as ``application/sdp`` (the text) or ``application/json`` (an
    RTCSessionDescription: ``{"type": "offer", "sdp": ...}``), checked as the mesh checks a gate's
    (wire.check_sdp); and whether it came as JSON (the answer is given the same way). SignalError if not."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/sdp":
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError:
            raise SignalError("offer is not UTF-8") from None
        as_json = False
    elif kind == "application/json":
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise SignalError("offer is not JSON") from None
        if not isinstance(value, dict) or value.get("type") != "offer" or not isinstance(value.get("sdp"), str):
            raise SignalError('expected {"type": "offer", "sdp": "..."}')
        sdp, as_json = value["sdp"], True
    else:
        raise SignalError("offer must be application/sdp or application/json")
    check_sdp(sdp)
    return sdp, as_json


def answer_body(sdp: str, as_json: bool) -> tuple[bytes, str]:
    """The answer as the offer came: the body and its content type."""
    if as_json:
        return json.dumps({"type": "answer", "sdp": sdp}).encode(), "application/json"
    return sdp.encode(), "application/sdp"


def target_of_label(label: str) -> Endpoint:
    """The destination a browser's channel names (``tcp:HOST:PORT``, IPv6 as ``[ADDR]:PORT``);
    ClientProtocolError if it names none."""
    if len(label) > MAX_LABEL or not label.startswith(LABEL_PREFIX):
        raise ClientProtocolError(f"channel label {label[:40]!r} is not tcp:HOST:PORT")
    try:
        return parse_endpoint(label[len(LABEL_PREFIX):])
    except ValueError as e:
        raise ClientProtocolError(f"channel label: {e}") from None


# -- one channel as a socket ---------------------------------------------------------------------

class BrowserChannel(asyncio.Protocol):
    """The gate's end of a socketpair whose other end the flow core relays: channel messages are
    written to it, what it reads is sent on the channel (paced by ``bufferedAmount``)."""

    def __init__(self, channel: RTCDataChannel, on_released: Callable[[BrowserChannel], None]) -> None:
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.flow_end: socket.socket | None = None  # the socketpair's other end, which the flow core relays
        # Ends the flow in the flow core at once (abort): a relay that no longer reads the socketpair
        # (the browser ended its side, or the upstream is slow) would not see a reset through it.
        self.cut_flow: Callable[[], None] | None = None
        self.early: list[bytes] = []
        self.early_bytes = 0
        self.browser_ended = False  # the browser closed the channel: FIN written to the socket
        self.closed = False
        self.reading_paused = False
        self.on_released = on_released
        channel.bufferedAmountLowThreshold = BUFFER_HIGH // 2
        channel.on("message", self._message)
        channel.on("close", self._channel_closed)
        channel.on("bufferedamountlow", self._resume)

    # the socket (the flow core's side)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's transports are not subclasses)
        if self.closed:
            transport.abort()  # type: ignore[attr-defined]
            return
        for data in self.early:
            self._write(data)
        self.early.clear()
        if self.browser_ended:
            self._write_eof()

    def data_received(self, data: bytes) -> None:
        if self.browser_ended:
            return  # the browser is gone for this flow: what the upstream still says is dropped
        for i in range(0, len(data), CHUNK):
            try:
                self.channel.send(data[i:i + CHUNK])
            except InvalidStateError:
                self.abort()
                return
        if self.channel.bufferedAmount > BUFFER_HIGH and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._release()
        self.channel.close()  # after the messages queued on it (aiortc resets a stream once they are sent)
        return False  # the socket closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self.channel.readyState != "closed":
            self.channel.close()

    # the channel (the browser's side)
    def _message(self, message: bytes | str) -> None:
        if self.closed:
            return
        data = message.encode() if isinstance(message, str) else message
        if self.transport is None:
            self.early_bytes += len(data)
            if self.early_bytes > MAX_EARLY:
                self.abort()
            else:
                self.early.append(data)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > MAX_UPLOAD_BUFFER:
            log.warning("webrtc_signal: a browser sent %d bytes past a slow upstream: flow cut", MAX_UPLOAD_BUFFER)
            self.abort()

    def _channel_closed(self) -> None:
        if self.closed:
            return
        self.browser_ended = True
        asyncio.get_running_loop().call_later(END_LINGER, self._linger_over)
        if self.transport is not None:
            self._write_eof()

    def _linger_over(self) -> None:
        if not self.closed:
            self.abort()

    def _write_eof(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()  # to drain (and drop) the rest until the upstream's end

    def _resume(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """The peer connection is gone, or the browser broke a bound: the flow sees a reset."""
        if self.closed:
            return
        self._release()
        if self.flow_end is not None:
            reset_on_close(self.flow_end)  # (a socketpair has no RST: the relay must not take it for a FIN)
        if self.transport is not None:
            abort_with_reset(self.transport)
        if self.cut_flow is not None:  # (the relay may not be reading the socketpair: half-closed, or paused)
            self.cut_flow()
        if self.channel.readyState != "closed":
            self.channel.close()

    def _release(self) -> None:
        if not self.closed:
            self.closed = True
            self.early.clear()
            self.on_released(self)


# -- peer connections ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BrowserLimits:
    max_peers: int  # peer connections at once, all browsers together
    max_peers_per_source: int  # of those, per signaling client address
    ice_timeout: float  # seconds for ICE and DTLS to connect after the answer
    idle: float  # seconds a connection may stay without a channel before it is closed
    # Channel flows of all connections together (the listener's max_flows): MAX_CHANNELS per connection
    # times max_peers would be far past the process's descriptors (three per flow).
    max_flows: int


class PeersFull(Exception):
    """No room for another browser peer connection (``status``: 429 for the source's share, 503 overall)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Peer:
    def __init__(self, pc: RTCPeerConnection, source: Endpoint, now: float) -> None:
        self.pc = pc
        self.source = source
        self.channels: set[BrowserChannel] = set()
        self.connected = False
        self.created = self.quiet_since = now
        self.refused_channels = 0

    def expired(self, now: float, limits: BrowserLimits) -> str | None:
        """Why this connection ends now, if it does."""
        if not self.connected:
            return f"not connected within {limits.ice_timeout:g}s" if now - self.created >= limits.ice_timeout else None
        if not self.channels and now - self.quiet_since >= limits.idle:
            return f"no channel for {limits.idle:g}s"
        return None


# A channel's flow: (the socket the flow core relays, the browser's signaling address, the destination)
# -> what ends that flow at once (with a reset to its upstream)
OnFlow = Callable[[socket.socket, Endpoint, Endpoint], Callable[[], None]]


class BrowserPeers:
    """The browser peer connections of one ``webrtc_signal`` listener, and their bounds."""

    def __init__(self, limits: BrowserLimits, on_flow: OnFlow) -> None:
        self.limits = limits
        self.on_flow = on_flow
        self.loop = asyncio.get_running_loop()
        self.peers: set[_Peer] = set()
        self.per_source: dict[str, int] = {}
        self.bad_labels = 0
        self.flows = 0  # open channel flows, all connections together
        self.refused_flows = 0  # channels closed at once for max_flows
        self.accepting = True  # False once the listener stops: new channels are closed
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweep = self.loop.call_later(self._sweep_every, self._expire)

    @property
    def _sweep_every(self) -> float:
        return max(0.05, min(self.limits.ice_timeout, self.limits.idle) / 4)

    async def answer(self, sdp: str, source: Endpoint) -> str:
        """The answer to a browser's offer (already checked: ``offer_of``); PeersFull past the bounds,
        SignalError if aiortc does not take the offer."""
        if len(self.peers) >= self.limits.max_peers:
            raise PeersFull(503, f"{self.limits.max_peers} browser peer connections open (max_peers)")
        held = self.per_source.get(source.host, 0)
        if held >= self.limits.max_peers_per_source:
            raise PeersFull(429, f"{source.host} holds {held} browser peer connections (max_peers_per_source)")
        peer = _Peer(new_peer_connection(), source, self.loop.time())
        self.peers.add(peer)  # counted from now: answers being built count too
        self.per_source[source.host] = held + 1
        peer.pc.on("connectionstatechange", lambda: self._state_changed(peer))
        peer.pc.on("datachannel", lambda channel: self._channel(peer, channel))
        try:
            await peer.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
            await peer.pc.setLocalDescription(await peer.pc.createAnswer())
        except Exception as e:  # aiortc's parser raises what it meets (ValueError, KeyError, ...): peer input
            self._close(peer, "bad offer")
            raise SignalError(f"offer not accepted: {type(e).__name__}") from None
        except BaseException:
            self._close(peer, "cancelled")
            raise
        return str(peer.pc.localDescription.sdp)

    def _state_changed(self, peer: _Peer) -> None:
        state = peer.pc.connectionState
        if state == "connected" and not peer.connected:
            peer.connected = True
            peer.quiet_since = self.loop.time()  # idle from now on, unless a channel is open
        elif state in ("failed", "closed"):
            self._close(peer, f"peer connection {state}")

    def _channel(self, peer: _Peer, channel: RTCDataChannel) -> None:
        if peer not in self.peers or not self.accepting:
            channel.close()
            return
        if self.flows >= self.limits.max_flows:
            self.refused_flows += 1
            if self.refused_flows in (1, 1000):
                log.warning("webrtc_signal: %d browser flows open (max_flows): closing new channels", self.flows)
            channel.close()
            return
        if len(peer.channels) >= MAX_CHANNELS:
            peer.refused_channels += 1
            if peer.refused_channels in (1, 1000):
                log.warning("webrtc_signal: browser %s opened over %d channels: closing the new ones",
                            peer.source.host, MAX_CHANNELS)
            channel.close()
            return
        try:
            target = target_of_label(channel.label)
        except ClientProtocolError as e:
            self.bad_labels += 1
            if self.bad_labels in (1, 1000):
                log.warning("webrtc_signal: browser %s: %s (channel closed)", peer.source.host, e)
            channel.close()
            return
        bridge = BrowserChannel(channel, lambda b: self._released(peer, b))
        peer.channels.add(bridge)
        self.flows += 1
        task = self.loop.create_task(self._attach(peer, bridge, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attach(self, peer: _Peer, bridge: BrowserChannel, target: Endpoint) -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        try:
            await self.loop.connect_accepted_socket(lambda: bridge, theirs)
        except BaseException:
            ours.close()
            theirs.close()
            bridge.abort()
            raise
        if bridge.closed:  # the connection went while we attached
            ours.close()
            return
        bridge.flow_end = ours
        bridge.cut_flow = self.on_flow(ours, peer.source, target)

    def _released(self, peer: _Peer, bridge: BrowserChannel) -> None:
        self.flows -= 1
        peer.channels.discard(bridge)
        if not peer.channels:
            peer.quiet_since = self.loop.time()

    def _expire(self) -> None:
        now = self.loop.time()
        for peer in list(self.peers):
            why = peer.expired(now, self.limits)
            if why is not None:
                self._close(peer, why)
        self._sweep = self.loop.call_later(self._sweep_every, self._expire)

    def _close(self, peer: _Peer, reason: str) -> None:
        if peer not in self.peers:
            return
        self.peers.discard(peer)
        left = self.per_source[peer.source.host] - 1
        if left:
            self.per_source[peer.source.host] = left
        else:
            del self.per_source[peer.source.host]
        log.info("webrtc_signal: browser peer connection of %s closed: %s", peer.source.host, reason)
        for bridge in list(peer.channels):
            if not bridge.browser_ended:  # (an ended one only drains its upstream: it ends cleanly by itself)
                bridge.abort()
        peer.channels.clear()
        task = self.loop.create_task(peer.pc.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Close every connection and wait for aiortc to let go of its sockets."""
        self._sweep.cancel()
        for peer in list(self.peers):
            self._close(peer, "shutdown")
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
