"""The serving side of WebRTC signaling: a peer gate's offer (arriving over an authenticated HTTP/2
exchange) answered with a peer connection whose channels carry flows to the gate's inbound serving.

The offer is refused unless the sending gate is a configured peer listing ``webrtc`` in its
``transports``, names itself with the gate ID its TLS certificate proved, and is a data-channel-only
description with one fingerprint (gate.mesh.webrtc.wire.check_sdp). aiortc then refuses a DTLS
handshake whose certificate does not match that fingerprint: the peer connection is as authenticated as
the HTTP/2 one. One connection per offering peer: a new offer replaces the old connection.

A relayed offer (two gates behind NAT, signaling through a public gate: gate.mesh.h2_exchange) is
taken as the offer of the gate the relay vouches for, only from the relay that gate's peer entry names
(``via_gate``), and must name that vouched-for ID, never merely one the offer states, and carry that
gate's seal (gate.mesh.webrtc.seal); the answer is sealed in turn.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from aiortc import RTCSessionDescription

from gate.addr import Endpoint
from gate.config import PeerSpec
from gate.mesh.transport import Exchange, Exchanged, ServeStream
from gate.mesh.webrtc.link import Link, TransportDown, new_peer_connection
from gate.mesh.webrtc.seal import Seal, Sealer, check_seal
from gate.mesh.webrtc.wire import SignalError, SignalMessage, check_sdp, decode_signal, encode_signal

__all__ = ["Answerer"]

log = logging.getLogger("ugate")


class Answerer:
    """Answers offers and keeps the resulting connections, one per offering peer."""

    def __init__(self, gate_id: str, ice_timeout: float, stun: tuple[Endpoint, ...] = (),
                 sealer: Sealer | None = None) -> None:
        self.gate_id = gate_id
        self.sealer = sealer  # this gate's key: seals answers to relayed offers
        self.stun = stun
        self.ice_timeout = ice_timeout
        self.links: dict[str, Link] = {}
        # Peers whose offer is being answered: one at a time each, so a peer sending offers in parallel
        # (up to the tunnel's 1000 streams) cannot make us build a peer connection, sockets and all, for each.
        self.answering: set[str] = set()
        self._watches: set[asyncio.Task[None]] = set()

    def exchange_for(self, serve: ServeStream) -> Exchange:
        return functools.partial(self.answer, serve)

    async def answer(self, serve: ServeStream, sender: Exchanged, body: bytes) -> bytes:
        """The answer to the offer in ``body`` from ``sender`` (an error message if refused)."""
        ident, peer = sender.ident, sender.peer
        if sender.origin is not None:  # relayed: the offer is the vouched-for gate's, if its relay is ours
            relay = peer
            ident, peer = sender.origin, sender.origin_peer
            if relay is None or peer is None or peer.via_gate != relay.name:
                return _refusal(ident, f"gate {sender.ident} may not relay offers from gate {ident[:60]}")
        if peer is None or "webrtc" not in peer.transports:
            return _refusal(ident, "webrtc is not offered to this gate")
        try:
            offer = decode_signal(body)
            if offer.error:
                raise SignalError("an error is not an offer")
            check_sdp(offer.sdp)
        except SignalError as e:
            return _refusal(ident, f"bad offer: {e}")
        if offer.gate != ident:
            return _refusal(ident, f"offer names gate {offer.gate[:60]}, the tunnel is gate {ident}")
        if sender.origin is not None:
            try:
                check_seal(Seal(offer.key, offer.sig), "offer", ident, self.gate_id, offer.sdp)
            except SignalError as e:
                return _refusal(ident, f"relayed offer: {e}")
        if peer.name in self.answering:
            return _refusal(ident, "another offer from this gate is being answered")
        self.answering.add(peer.name)
        try:
            return await self._answer(serve, ident, peer, offer.sdp, sender.origin is not None)
        finally:
            self.answering.discard(peer.name)

    async def _answer(self, serve: ServeStream, ident: str, peer: PeerSpec, sdp: str, relayed: bool) -> bytes:
        old = self.links.pop(peer.name, None)
        if old is not None:
            old.close("replaced by a new offer")
        link = Link(peer.name, new_peer_connection(self.stun))
        link.serve_with(ident, peer, serve)
        try:
            await link.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
            await link.pc.setLocalDescription(await link.pc.createAnswer())
        except Exception as e:  # aiortc's parser raises what it meets (ValueError, KeyError, ...): peer input
            link.close("bad offer")
            return _refusal(ident, f"offer not accepted: {type(e).__name__}")
        self.links[peer.name] = link
        link.on_lost = functools.partial(self._lost, peer.name)
        watch = asyncio.get_running_loop().create_task(self._watch(link))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        log.info("webrtc: answered an offer from %s (%s)", peer.name, ident)
        answer = SignalMessage(gate=self.gate_id, sdp=link.pc.localDescription.sdp)
        if relayed and self.sealer is not None:
            seal = self.sealer.seal("answer", self.gate_id, ident, answer.sdp, sdp)
            answer = SignalMessage(gate=answer.gate, sdp=answer.sdp, key=seal.key, sig=seal.sig)
        return encode_signal(answer)

    async def _watch(self, link: Link) -> None:
        try:
            await link.wait_connected(self.ice_timeout)
        except TransportDown as e:
            log.warning("webrtc: connection offered by %s failed: %s", link.peer, e)

    def _lost(self, name: str, link: Link) -> None:
        if self.links.get(name) is link:
            del self.links[name]

    def close(self) -> None:
        for task in list(self._watches):
            task.cancel()
        for link in list(self.links.values()):
            link.close("shutdown")


def _refusal(ident: str, reason: str) -> bytes:
    log.warning("webrtc: offer from gate %s refused: %s", ident, reason)
    return encode_signal(SignalMessage(error=reason))
