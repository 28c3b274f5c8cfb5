"""The WebRTC transport's dialling side (``transport.Alternative``, held by the HTTP/2 mesh): flows to a
peer whose ``transports`` list ``webrtc`` first go over a data channel of one peer connection per peer;
when that connection cannot be made (the peer refuses the offer, ICE or DTLS fail or time out) the flow
falls back to HTTP/2 (with ``[webrtc, h2]``) and WebRTC is tried again after a backoff.

The offer travels over the HTTP/2 mesh connection to the peer (``exchange``: gate.mesh.h2_exchange), or,
for a peer reached through another gate (``via_gate``: both behind NAT), to that gate, which relays it;
such an offer and its answer are sealed with the two gates' keys (gate.mesh.webrtc.seal), so the relay
cannot swap the DTLS fingerprints.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from aiortc import RTCDataChannel, RTCSessionDescription

from gate.addr import Endpoint
from gate.config import PeerSpec
from gate.errors import GateError
from gate.flow import Flow
from gate.mesh.transport import Datagrams, Exchange, FlowMeta, ServeStream
from gate.mesh.webrtc.answerer import Answerer
from gate.mesh.webrtc.link import Link, TransportDown, closed_all, new_peer_connection
from gate.mesh.webrtc.seal import Seal, Sealer, check_seal
from gate.mesh.webrtc.wire import SignalError, SignalMessage, check_sdp, decode_signal, encode_signal

__all__ = ["ICE_TIMEOUT", "WebrtcMesh"]

log = logging.getLogger("ugate")

ICE_TIMEOUT = 5.0  # seconds for signaling + ICE + DTLS before a flow falls back (at most half its budget)
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 60.0  # seconds before WebRTC to a failed peer is tried again

_T = TypeVar("_T")

# (peer name, kind, body, deadline) -> the peer's answer: gate.mesh.dialer.Mesh.exchange
Send = Callable[[str, str, bytes, float], Awaitable[bytes]]


class _PeerState:
    def __init__(self) -> None:
        self.link: Link | None = None
        self.connecting: asyncio.Future[Link] | None = None
        self.backoff = 0.0
        self.retry_at = 0.0


class WebrtcMesh:
    """Peer connections we offered (dialling) and the answerer for those offered to us (serving)."""

    def __init__(self, gate_id: str, peers: tuple[PeerSpec, ...], send: Send, ice_timeout: float = ICE_TIMEOUT,
                 stun: tuple[Endpoint, ...] = (), sealer: Sealer | None = None,
                 ids: Mapping[str, str | None] | None = None):
        """``sealer``: this gate's key, to seal relayed offers and answers; ``ids``: peer name -> gate ID
        (gate.mesh.peers.Peers.id_of), whose seal a relayed answer must carry."""
        self.gate_id = gate_id
        self.sealer = sealer
        self.ids = dict(ids or {})
        self.stun = stun  # STUN servers for server-reflexive candidates (mesh.stun)
        self.specs = {p.name: p for p in peers}
        self.send = send
        self.ice_timeout = ice_timeout
        self.state = {p.name: _PeerState() for p in peers if p.transports[0] == "webrtc"}
        self.answerer = Answerer(gate_id, ice_timeout, stun, sealer)
        self._tasks: set[asyncio.Task[Link]] = set()

    def exchange_for(self, serve: ServeStream) -> Exchange:
        return self.answerer.exchange_for(serve)

    async def open_stream(self, peer: str, flow: Flow, deadline: float) -> socket.socket | None:
        return await self._over_link(peer, deadline, lambda link: link.open_flow(FlowMeta.of(flow), deadline))

    async def open_datagrams(self, peer: str, meta: FlowMeta, on_datagram: Callable[[bytes], None],
                             on_end: Callable[[GateError | None], None], deadline: float) -> Datagrams | None:
        return await self._over_link(peer, deadline,
                                     lambda link: link.open_datagrams(meta, on_datagram, on_end, deadline))

    async def _over_link(self, peer: str, deadline: float, use: Callable[[Link], Awaitable[_T]]) -> _T | None:
        """``use`` the connection to ``peer`` (made now if need be); None where HTTP/2 carries the flow
        instead: WebRTC is not first for this peer, or failed and ``h2`` follows it."""
        state = self.state.get(peer)
        if state is None:
            return None  # HTTP/2 first (or only) for this peer
        spec = self.specs[peer]
        fallback = "h2" in spec.transports
        loop = asyncio.get_running_loop()
        if fallback and state.link is None and state.connecting is None and loop.time() < state.retry_at:
            return None
        try:
            link = await self._link(peer, state, min(deadline, loop.time() + min(self.ice_timeout,
                                                                                  (deadline - loop.time()) / 2)))
            return await use(link)
        except TransportDown as e:
            if not fallback:
                raise
            log.info("webrtc: flow to %s falls back to h2: %s", peer, e)
            return None

    async def _link(self, peer: str, state: _PeerState, deadline: float) -> Link:
        if state.link is not None and not state.link.closed:
            return state.link
        loop = asyncio.get_running_loop()
        if state.connecting is None:
            state.connecting = loop.create_future()
            task = loop.create_task(self._offer(self.specs[peer], loop.time() + self.ice_timeout))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._offered, state))
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(state.connecting)
        except TimeoutError:
            raise TransportDown(f"webrtc to {peer}: not connected in time") from None

    def _offered(self, state: _PeerState, task: asyncio.Task[Link]) -> None:
        self._tasks.discard(task)
        future, state.connecting = state.connecting, None
        assert future is not None
        if task.cancelled():
            future.cancel()
            return
        error = task.exception()
        loop = asyncio.get_running_loop()
        if error is None:
            state.link = link = task.result()
            state.backoff = 0.0
            link.on_lost = functools.partial(_forget, state)
            future.set_result(link)
            log.info("webrtc: connected to %s", link.peer)
            return
        state.backoff = min(max(state.backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
        state.retry_at = loop.time() + state.backoff
        log.warning("webrtc: cannot connect: %s; trying again in %gs", error, state.backoff)
        future.set_exception(error if isinstance(error, TransportDown) else TransportDown(str(error)))
        future.exception()  # retrieved: nobody may be waiting any more

    async def _offer(self, spec: PeerSpec, deadline: float) -> Link:
        """A connected peer connection to ``spec``: offer, the answer over the mesh, ICE and DTLS."""
        link = Link(spec.name, new_peer_connection(self.stun))
        link.pc.on("datachannel", _close_channel)  # the answering gate opens none
        link.offer_control()
        loop = asyncio.get_running_loop()
        try:
            await link.pc.setLocalDescription(await link.pc.createOffer())  # gathers the host candidates
            offer = SignalMessage(gate=self.gate_id, sdp=link.pc.localDescription.sdp)
            peer_id = self.ids.get(spec.name) or ""
            if spec.via_gate is not None:  # relayed: sealed both ways, end to end
                if self.sealer is None or not peer_id:
                    raise TransportDown(f"webrtc to {spec.name}: a relayed offer needs our key and its gate ID")
                seal = self.sealer.seal("offer", self.gate_id, peer_id, offer.sdp)
                offer = SignalMessage(gate=offer.gate, sdp=offer.sdp, key=seal.key, sig=seal.sig)
            answer = decode_signal(await self.send(spec.name, "webrtc", encode_signal(offer), deadline))
            if answer.error:
                raise TransportDown(f"webrtc to {spec.name} refused: {answer.error}")
            check_sdp(answer.sdp)
            if spec.via_gate is not None:
                check_seal(Seal(answer.key, answer.sig), "answer", peer_id, self.gate_id, answer.sdp, offer.sdp)
            await link.pc.setRemoteDescription(RTCSessionDescription(answer.sdp, "answer"))
            await link.wait_connected(max(deadline - loop.time(), 0.001))
        except TransportDown:
            link.close("failed")
            raise
        except (GateError, SignalError) as e:
            link.close("failed")
            raise TransportDown(f"webrtc to {spec.name}: {e}") from None
        except Exception as e:  # aiortc's parser raises what it meets (ValueError, KeyError, ...): peer input
            link.close("failed")
            raise TransportDown(f"webrtc to {spec.name}: answer not accepted ({type(e).__name__}: {e})") from None
        except BaseException:
            link.close("cancelled")
            raise
        return link

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for state in self.state.values():
            if state.link is not None:
                state.link.close("shutdown")

    async def aclose(self) -> None:
        """Close every peer connection and wait for aiortc to let go of its sockets."""
        self.close()
        self.answerer.close()
        await closed_all()


def _forget(state: _PeerState, link: Link) -> None:
    if state.link is link:
        state.link = None


def _close_channel(channel: RTCDataChannel) -> None:
    channel.close()


