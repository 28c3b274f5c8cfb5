"""Finds the endpoint of each WireGuard peer by ICE and points the interface at it (issue 14).

Per peer in ``wireguard.peers``: an ICE agent on the peer's ICE port (gate.wireguard.ice), an offer and
answer exchanged over the authenticated mesh (kind ``wireguard``, gate.wireguard.signal), then, once a
pair is selected, ``wg set IF peer KEY endpoint REMOTE`` and (mode 3) the output rewrite for REMOTE
(tproxy.wg_redirect). The session is re-run when the pair loses consent or the signalling fails; a change
of the interface's listen port rebuilds the rules (their input rewrite targets it).

Who offers: a gate that can open streams to its ``via`` peer (it dials it: not ``reverse``, has an
``address``) offers when its gate ID is the smaller, or when no offer came for ``OFFER_WAIT`` seconds (the
other side may only be reachable through its reverse tunnel); an offer arriving for a peer replaces that
peer's session. A relay (``relay: true``, a public gate) forwards an offer addressed to another of its
peers, writing the authenticated sender into ``from``; an endpoint believes ``from`` only from a gate it
names as some WireGuard peer's ``via``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from gate.accesslog import AccessLog
from gate.config import PeerSpec
from gate.errors import GateError, RejectedByRule
from gate.mesh.dialer import Mesh
from gate.mesh.transport import Exchanged
from gate.wg_spec import WgMode, WgPeerSpec, WireguardSpec
from gate.wireguard import wgtool
from gate.wireguard.ice import IceAgent, IceFailed
from gate.wireguard.proxy import LOOPBACK, WgProxy
from gate.wireguard.signal import KIND, Signal, SignalError, decode, encode
from tproxy import wg_redirect

__all__ = ["WireguardService", "sender_of"]

log = logging.getLogger("ugate")

SIGNAL_TIMEOUT = 15.0  # seconds for an offer's answer (through a relay: two exchanges and one gathering)
ICE_TIMEOUT = 30.0  # seconds for the checks to select a pair
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # backoff between failed sessions with one peer
OFFER_WAIT = 10.0  # seconds the larger gate ID waits for the smaller one's offer before it offers itself
LISTEN_POLL = 2.0  # seconds between reads of the interface's listen port (when the config does not fix it)


def sender_of(offer: Signal, ident: str, sent_by: str | None, peers: tuple[WgPeerSpec, ...]) -> WgPeerSpec:
    """The WireGuard peer an offer is from: the gate the mesh authenticated (``ident``, its ``peers:`` entry
    ``sent_by``), or, when that gate is the ``via`` of the peer the offer names in ``from``, that peer (a
    relay vouches for whom it forwards). RejectedByRule for anyone else. Pure."""
    if offer.sender is not None and offer.sender != ident:
        peer = next((p for p in peers if p.gate == offer.sender), None)
        if peer is None or sent_by is None or peer.via != sent_by:
            raise RejectedByRule(f"wireguard: gate {ident} may not speak for gate {offer.sender}")
        return peer
    peer = next((p for p in peers if p.gate == ident), None)
    if peer is None:
        raise RejectedByRule(f"wireguard: gate {ident} is not a WireGuard peer of ours")
    return peer


class _Peer:
    def __init__(self, spec: WgPeerSpec) -> None:
        self.spec = spec
        self.task: asyncio.Task[None] | None = None  # the running session (offered or answered)
        self.endpoint: tuple[str, int] | None = None  # the selected pair's remote
        self.proxy: WgProxy | None = None  # mode 1: the peer's loopback endpoint
        self.offering = False  # ``task`` is our own offer (not an answered one)
        self.offered = asyncio.Event()  # an offer from this peer arrived (the waiting side need not offer)
        self.backoff = 0.0


class WireguardService:
    def __init__(self, spec: WireguardSpec, own_id: str, mesh: Mesh, mesh_peers: tuple[PeerSpec, ...],
                 access_log: AccessLog) -> None:
        self.spec = spec
        self.own_id = own_id
        self.mesh = mesh
        self.mesh_peers = {p.name: p for p in mesh_peers}
        self.access_log = access_log
        self.peers = {p.gate: _Peer(p) for p in spec.peers}
        self.public_key = ""
        self.listen_port = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rules = False

    # -- life --------------------------------------------------------------------------------------

    def serve_signalling(self) -> None:
        """Answer (and relay) offers on every mesh tunnel made from now on."""
        self.mesh.exchanges[KIND] = self._on_signal

    async def start(self) -> None:
        """Read the interface, install the mode-3 rules, start the peers' sessions. OSError if the
        interface cannot be read or the rules cannot be applied."""
        self.serve_signalling()
        if self.spec.interface is None:
            return
        dump = await asyncio.to_thread(wgtool.show, self.spec.interface)
        self.public_key = dump.public_key
        self.listen_port = self.spec.listen_port or dump.listen_port
        if self.peers and self.spec.mode == WgMode.NFTABLES:
            await asyncio.to_thread(wg_redirect.apply, self._redirect())
            self._rules = True
            log.info("wireguard: %s (listen port %d): mode %s rules for ICE ports %s", self.spec.interface,
                     self.listen_port, self.spec.mode, ",".join(str(p.ice_port) for p in self.spec.peers))
        elif self.peers:
            log.info("wireguard: %s (listen port %d): mode %s, relaying from ICE ports %s", self.spec.interface,
                     self.listen_port, self.spec.mode, ",".join(str(p.ice_port) for p in self.spec.peers))
        for peer in self.peers.values():
            self._spawn(self._peer_loop(peer))
        if self.spec.listen_port is None and self.peers:  # (mode 1 too: its relays send to the port)
            self._spawn(self._watch_listen_port())

    async def aclose(self) -> None:
        self.mesh.exchanges.pop(KIND, None)
        tasks = [*self._tasks, *(p.task for p in self.peers.values() if p.task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._rules:
            try:
                await asyncio.to_thread(wg_redirect.clear)
                log.info("wireguard: rules cleared")
            except OSError as e:
                log.error("wireguard: cannot clear the rules: %s", e)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _redirect(self) -> wg_redirect.WgRedirect:
        return wg_redirect.WgRedirect(self.listen_port, tuple(p.ice_port for p in self.spec.peers))

    # -- offering ----------------------------------------------------------------------------------

    def _can_offer(self, peer: WgPeerSpec) -> bool:
        via = self.mesh_peers.get(peer.via)
        return via is not None and via.address is not None and not via.reverse

    async def _peer_loop(self, peer: _Peer) -> None:
        """Offer (when ours to), wait for the session to end, again after a backoff."""
        loop = asyncio.get_running_loop()
        while True:
            if peer.task is not None and not peer.task.done():  # a session (ours or answered) runs
                await asyncio.wait({peer.task})
                continue
            if peer.task is not None and not peer.task.cancelled() and peer.task.exception() is not None:
                self._failed(peer, "session", peer.task.exception() or RuntimeError())  # a bug: never a spin
            peer.task = None
            peer.offered.clear()
            if not self._can_offer(peer.spec):
                await peer.offered.wait()
                continue
            if self.own_id > peer.spec.gate:  # the smaller ID offers: wait a while for it
                try:
                    async with asyncio.timeout(OFFER_WAIT):
                        await peer.offered.wait()
                    continue
                except TimeoutError:
                    pass
            if peer.backoff:
                await asyncio.sleep(peer.backoff)
            if peer.task is None:
                peer.task = loop.create_task(self._offer(peer))
                peer.offering = True

    def _failed(self, peer: _Peer, what: str, e: BaseException) -> None:
        peer.backoff = min(max(peer.backoff * 2, RETRY_FIRST), RETRY_MAX)
        log.warning("wireguard: %s with gate %s failed: %s; again in %.0fs", what, peer.spec.gate,
                    str(e) or type(e).__name__, peer.backoff)

    async def _offer(self, peer: _Peer) -> None:
        agent = IceAgent(True, peer.spec.ice_port, (self.spec.interface or "",), self._stun())
        try:
            ufrag, pwd, candidates = await agent.gather()
            offer = Signal(to=peer.spec.gate, key=self.public_key, ufrag=ufrag, pwd=pwd, candidates=candidates)
            deadline = asyncio.get_running_loop().time() + SIGNAL_TIMEOUT
            answer = decode(await self.mesh.exchange(peer.spec.via, KIND, encode(offer), deadline))
            if answer.to != self.own_id:
                raise SignalError(f"the answer is for gate {answer.to}")
            await self._session(peer, agent, answer)
        except (GateError, SignalError, IceFailed, OSError, TimeoutError) as e:
            self._failed(peer, "offer", e)
        finally:
            await agent.close()

    def _stun(self) -> tuple[str, int] | None:
        return (self.spec.stun[0].host, self.spec.stun[0].port) if self.spec.stun else None

    # -- a session ---------------------------------------------------------------------------------

    async def _session(self, peer: _Peer, agent: IceAgent, remote: Signal) -> None:
        """Checks, then the endpoint, then wait until the pair fails (consent) or we stop."""
        started = time.time()
        try:
            async with asyncio.timeout(ICE_TIMEOUT):
                host, port = await agent.connect(remote.ufrag, remote.pwd, remote.candidates)
            if self.spec.mode == WgMode.PROXY:
                peer.proxy, local = await WgProxy.open(agent, self.listen_port, (host, port), agent.counts)
                await asyncio.to_thread(self._point, peer, remote.key, (host, port), (LOOPBACK, local))
            else:
                await asyncio.to_thread(self._point, peer, remote.key, (host, port), (host, port))
            peer.backoff = 0.0
            log.info("wireguard: peer %s (gate %s) at %s:%d via ICE port %d", remote.key, peer.spec.gate, host, port,
                     peer.spec.ice_port)
            self._record(peer, agent, started, "selected")
            await agent.wait_closed()
            raise IceFailed("the selected pair lost consent")
        finally:
            if peer.proxy is not None:
                peer.proxy.close()
                peer.proxy = None
            self._record(peer, agent, started, "ended")

    def _point(self, peer: _Peer, key: str, remote: tuple[str, int], endpoint: tuple[str, int]) -> None:
        """WireGuard's endpoint for the peer: the remote itself (mode 3, with the output rewrite for it) or
        our loopback relay (mode 1)."""
        assert self.spec.interface is not None  # (peers need an interface)
        if self._rules:
            wg_redirect.set_endpoint(*remote, peer.spec.ice_port, peer.endpoint)
        wgtool.set_peer(self.spec.interface, key, peer.spec.allowed_ips, *endpoint, peer.spec.keepalive)
        peer.endpoint = remote

    def _record(self, peer: _Peer, agent: IceAgent, started: float, event: str) -> None:
        """Counters in the access log: what reached ugate's ICE socket (mode 3: STUN only)."""
        self.access_log.write({"ts": round(started, 3), "event": f"wireguard {event}", "peer": peer.spec.gate,
                               "interface": self.spec.interface, "mode": str(self.spec.mode),
                               "ice_port": peer.spec.ice_port, "listen_port": self.listen_port,
                               "endpoint": None if peer.endpoint is None else f"{peer.endpoint[0]}:{peer.endpoint[1]}",
                               "stun": agent.counts["stun"], "wireguard": agent.counts["wireguard"],
                               "other": agent.counts["other"],
                               **({k: agent.counts[k] for k in ("wireguard_out", "wireguard_dropped", "proxy_refused")}
                                  if self.spec.mode == WgMode.PROXY else {})})

    # -- answering and relaying --------------------------------------------------------------------

    async def _on_signal(self, exchanged: Exchanged, body: bytes) -> bytes:
        """The mesh exchange handler: an offer for us (answered), or for a peer of ours (relayed)."""
        ident, sent_by = exchanged.ident, exchanged.peer
        try:
            offer = decode(body)
        except SignalError as e:
            raise RejectedByRule(f"wireguard signalling from {ident}: {e}") from None
        if offer.to != self.own_id:
            return await self._relay(ident, sent_by, offer)
        wg_peer = sender_of(offer, ident, sent_by.name if sent_by is not None else None, self.spec.peers)
        peer = self.peers[wg_peer.gate]
        sender = wg_peer.gate
        if self.spec.interface is None:
            raise RejectedByRule("wireguard: this gate has no interface")
        if peer.offering and peer.task is not None and not peer.task.done() and self.own_id < sender:
            raise RejectedByRule("wireguard: both offered; the smaller gate ID's offer stands")  # (glare)
        if peer.task is not None:
            peer.task.cancel()  # an ICE restart: the peer's new offer replaces the old session
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await peer.task
        agent = IceAgent(False, peer.spec.ice_port, (self.spec.interface,), self._stun())
        try:
            ufrag, pwd, candidates = await agent.gather()
        except OSError as e:
            await agent.close()
            raise RejectedByRule(f"wireguard: cannot gather on port {peer.spec.ice_port}: {e}") from None
        peer.task = asyncio.get_running_loop().create_task(self._answered(peer, agent, offer))
        peer.offering = False
        peer.offered.set()
        return encode(Signal(to=sender, key=self.public_key, ufrag=ufrag, pwd=pwd, candidates=candidates))

    async def _answered(self, peer: _Peer, agent: IceAgent, offer: Signal) -> None:
        try:
            await self._session(peer, agent, offer)
        except (IceFailed, OSError, TimeoutError) as e:
            self._failed(peer, "answered session", e)
        finally:
            await agent.close()

    async def _relay(self, ident: str, sent_by: PeerSpec | None, offer: Signal) -> bytes:
        if not self.spec.relay or sent_by is None:
            raise RejectedByRule(f"wireguard: offer from {ident} for gate {offer.to}: this gate relays none")
        target = self.mesh.trust.by_id.get(offer.to)  # (pinned by id: or cert:)
        if target is None:
            raise RejectedByRule(f"wireguard: offer from {ident} for gate {offer.to}, not a peer of ours")
        deadline = asyncio.get_running_loop().time() + SIGNAL_TIMEOUT
        log.info("wireguard: relaying an offer from gate %s to %s", ident, target.name)
        return await self.mesh.exchange(target.name, KIND, encode(offer.via_relay(ident)), deadline)

    # -- the listen port ---------------------------------------------------------------------------

    async def _watch_listen_port(self) -> None:
        """Rebuild the rules when the interface's listen port changes (their input rewrite targets it);
        the output rewrites (map elements) are put back, the ICE sessions and the NAT mapping stay."""
        assert self.spec.interface is not None
        while True:
            await asyncio.sleep(LISTEN_POLL)
            try:
                dump = await asyncio.to_thread(wgtool.show, self.spec.interface)
            except OSError as e:
                log.warning("wireguard: cannot read %s: %s", self.spec.interface, e)
                continue
            if dump.listen_port == self.listen_port:
                continue
            log.info("wireguard: %s listen port %d -> %d: %s", self.spec.interface, self.listen_port,
                     dump.listen_port, "rules rebuilt" if self._rules else "relays follow")
            self.listen_port = dump.listen_port
            for peer in self.peers.values():
                if peer.proxy is not None:
                    peer.proxy.listen_port = dump.listen_port
            if self._rules:
                await asyncio.to_thread(self._rebuild)

    def _rebuild(self) -> None:
        wg_redirect.apply(self._redirect())
        for peer in self.peers.values():
            if peer.endpoint is not None:
                wg_redirect.set_endpoint(*peer.endpoint, peer.spec.ice_port)
