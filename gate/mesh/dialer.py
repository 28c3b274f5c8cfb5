"""The HTTP/2 mesh transport (``transport.Transport``): flows ``via`` a peer gate, one TLS + HTTP/2
connection per peer, one CONNECT stream per flow.

The listener side stays the same for every kind (SOCKS replies, half-close, relays): ``open`` returns
one end of a socketpair whose other end is bridged to the stream, so a tunnelled flow looks to the
listener like any upstream socket. The peer's answer is mapped back to the errors listeners already
turn into the client's answer (SOCKS reply code, HTTP 403/502/504, TCP reset).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Callable

from gate.addr import Endpoint
from gate.config import PeerSpec
from gate.dial import SocketOptions, open_tcp
from gate.errors import GateError, UpstreamTimeout, UpstreamUnreachable
from gate.flow import Flow
from gate.mesh.datagrams import DatagramFlow
from gate.mesh.h2_exchange import RELAY, Relay, request
from gate.mesh.h2_streams import ERROR_HEADER, Serve, error_for_status, meta_headers, request_handler, udp_headers
from gate.mesh.session import Channel, Session
from gate.mesh.transport import Alternative, Exchange, FlowMeta, ServeStream
from gate.mesh.trust import Trust

__all__ = ["Mesh", "reset_on_close"]

log = logging.getLogger("ugate")

BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0  # seconds between connection attempts to a failing peer
CONNECT_TIMEOUT = 10.0  # for a reverse tunnel's connection (no flow is waiting on it)


def reset_on_close(ours: socket.socket) -> None:
    """A socketpair cannot send RST, but a unix socket closed with unread bytes makes its peer's next
    read fail with ECONNRESET: one byte sent from our end before the bridge closes its end does that,
    so the relay resets the client instead of ending a truncated flow with a clean FIN."""
    try:
        ours.send(b"\0", socket.MSG_DONTWAIT)
    except OSError:
        pass  # the listener closed its end already (fileno -1): nobody is left to tell


def _set_event(event: asyncio.Event, _session: Session) -> None:
    event.set()


class _Peer:
    """Connection state of one peer: its session, or the attempt under way, or when to retry."""

    def __init__(self, spec: PeerSpec) -> None:
        self.spec = spec
        self.session: Session | None = None
        self.connecting: asyncio.Future[Session] | None = None
        self.backoff = 0.0
        self.retry_at = 0.0
        self.last_error = ""
        self.arrived = asyncio.Event()  # a peer without an address: its reverse tunnel is up


async def _answered(session: Session, peer_name: str, stream_id: int, answer: asyncio.Future[dict[str, str]],
                    deadline: float, timeout: float) -> None:
    """Wait for the peer's answer to a stream we opened: a GateError unless it is 200 (the stream is
    then discarded, as it is when we are cancelled meanwhile)."""
    try:
        async with asyncio.timeout_at(deadline):
            response = await answer
    except TimeoutError:
        session.discard(stream_id)
        raise UpstreamTimeout(f"via {peer_name}: no answer within {timeout:g}s") from None
    except (ConnectionError, OSError) as e:
        session.discard(stream_id)
        raise UpstreamUnreachable(f"via {peer_name}: {e}") from None
    except BaseException:
        session.discard(stream_id)
        raise
    status = response.get(":status", "")
    if status != "200":
        session.discard(stream_id)
        raise error_for_status(peer_name, status, response.get(ERROR_HEADER, ""))


class Mesh:
    """The client side of the mesh for one process."""

    def __init__(self, trust: Trust, mark: int | None = None) -> None:
        self.trust = trust
        self.mark = mark
        self.peers = {p.name: _Peer(p) for p in trust.peers}
        self._reverse_tasks: list[asyncio.Task[None]] = []
        self._udp_setups: set[asyncio.Task[None]] = set()  # CONNECT-UDP streams being set up
        self._closing = False
        self.alternative: Alternative | None = None  # WebRTC (gate.mesh.webrtc), tried first where configured
        self.exchanges: dict[str, Exchange] = {}  # more exchange kinds served (gate.wireguard's signalling)
        self.relay = Relay(self._relayed)  # passes on signaling between peers we relay for (h2_exchange)

    async def open_stream(self, peer_name: str, flow: Flow, timeout: float) -> socket.socket:
        """A socket carrying ``flow`` to its destination through ``peer_name``; GateError if not."""
        peer = self._peer(peer_name)
        deadline = asyncio.get_running_loop().time() + timeout
        if self.alternative is not None:
            sock = await self.alternative.open_stream(peer_name, flow, deadline)
            if sock is not None:
                return sock
        session = await self._session(self._carrier(peer), deadline)
        meta = FlowMeta.of(flow)
        try:
            stream_id, answer = session.open_stream(str(meta.dst), meta_headers(meta))
        except Exception as e:  # h2 refuses (e.g. too many streams) or the connection just closed
            raise UpstreamUnreachable(f"via {peer_name}: {e}") from None
        await _answered(session, peer_name, stream_id, answer, deadline, timeout)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        try:
            bridge = await session.attach(stream_id, theirs)
            bridge.on_abort = functools.partial(reset_on_close, ours)
        except (ConnectionError, OSError) as e:
            ours.close()
            session.discard(stream_id)
            raise UpstreamUnreachable(f"via {peer_name}: {e}") from None
        except BaseException:
            ours.close()
            theirs.close()
            session.discard(stream_id)
            raise
        return ours

    def open_datagrams(self, peer_name: str, flow: Flow, dst: Endpoint, on_datagram: Callable[[bytes], None],
                       on_end: Callable[[GateError | None], None], timeout: float) -> DatagramFlow:
        """Datagrams of ``flow`` to ``dst`` through ``peer_name`` on a CONNECT-UDP stream (or the
        alternative's channel: WebRTC), usable at once: they queue (bounded) while the stream is set up
        in a task (see ``Transport.open_datagrams``)."""
        handle = DatagramFlow()
        task = asyncio.get_running_loop().create_task(
            self._open_datagrams(handle, peer_name, FlowMeta.of(flow, dst), on_datagram, on_end, timeout))
        self._udp_setups.add(task)
        task.add_done_callback(self._udp_setups.discard)
        handle.setup(task.cancel)
        return handle

    async def _open_datagrams(self, handle: DatagramFlow, peer_name: str, meta: FlowMeta,
                              on_datagram: Callable[[bytes], None], on_end: Callable[[GateError | None], None],
                              timeout: float) -> None:
        """The alternative's (WebRTC) first where the peer lists it, else a CONNECT-UDP stream."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def ended(error: GateError | None) -> None:
            if not handle.closed:
                handle.closed = True
                on_end(error)

        channel: Channel | None = None
        try:
            tunnel = None if self.alternative is None else await self.alternative.open_datagrams(
                peer_name, meta, on_datagram, ended, deadline)
            if tunnel is None:
                tunnel = channel = await self._datagram_stream(peer_name, meta, deadline - loop.time())
        except GateError as e:
            ended(e)
            return
        if handle.closed:  # given up on while the stream was set up
            tunnel.close()
            return
        if channel is not None:
            channel.on_closed = lambda c: ended(None if c.error is None
                                                else UpstreamUnreachable(f"via {peer_name}: {c.error}"))
            channel.open(on_datagram)
        handle.attach(tunnel)

    async def _datagram_stream(self, peer_name: str, meta: FlowMeta, timeout: float) -> Channel:
        peer = self._peer(peer_name)
        deadline = asyncio.get_running_loop().time() + timeout
        session = await self._session(self._carrier(peer), deadline)
        if not session.extended_connect():  # h2 would send it anyway
            raise UpstreamUnreachable(f"via {peer_name}: the peer does not accept CONNECT-UDP")
        try:
            stream_id, answer = session.open_stream(peer_name, udp_headers(peer_name, meta), Channel)
        except Exception as e:  # h2 refuses (e.g. too many streams) or the connection just closed
            raise UpstreamUnreachable(f"via {peer_name}: {e}") from None
        await _answered(session, peer_name, stream_id, answer, deadline, timeout)
        channel = session.bridges.get(stream_id)
        if not isinstance(channel, Channel) or channel.closed:
            session.discard(stream_id)
            raise UpstreamUnreachable(f"via {peer_name}: the stream ended as it was answered")
        return channel

    async def exchange(self, peer_name: str, kind: str, body: bytes, deadline: float) -> bytes:
        """Send ``body`` to ``peer_name`` over our tunnel to it and return its answer (gate.mesh.h2_exchange);
        to a peer reached through another gate (``via_gate``), that gate relays it."""
        peer = self._peer(peer_name)
        gate = self._carrier(peer)
        to = self.trust.policy.id_of(peer.spec) if gate is not peer else None
        return await request(await self._session(gate, deadline), gate.spec.name, kind, body, deadline,
                             lambda answer: error_for_status(gate.spec.name, answer.get(":status", ""),
                                                             answer.get(ERROR_HEADER, "")), to=to)

    async def _relayed(self, peer_name: str, kind: str, body: bytes, deadline: float, vouch: str) -> bytes:
        """We relay: pass ``body`` on to ``peer_name``, vouching that gate ``vouch`` sent it."""
        peer = self._peer(peer_name)
        return await request(await self._session(peer, deadline), peer_name, kind, body, deadline,
                             lambda answer: error_for_status(peer_name, answer.get(":status", ""),
                                                             answer.get(ERROR_HEADER, "")), vouch=vouch)

    def exchanges_for(self, serve: ServeStream) -> dict[str, Exchange]:
        """The exchanges the tunnels whose streams ``serve`` answers also answer (WebRTC signaling, and
        relaying it for the peers whose ``relay:`` allows it)."""
        exchanges: dict[str, Exchange] = {RELAY: self.relay, **self.exchanges}
        if self.alternative is not None:
            exchanges["webrtc"] = self.alternative.exchange_for(serve)
        return exchanges

    def _peer(self, peer_name: str) -> _Peer:
        peer = self.peers.get(peer_name)
        if peer is None:
            raise UpstreamUnreachable(f"no peer is named {peer_name}")
        return peer

    def _carrier(self, peer: _Peer) -> _Peer:
        """The peer whose connection carries HTTP/2 streams to ``peer``: itself, or the gate it is reached
        through (``via_gate``; that gate's routes send the flows on)."""
        return self.peers[peer.spec.via_gate] if peer.spec.via_gate is not None else peer

    async def _session(self, peer: _Peer, deadline: float) -> Session:
        loop = asyncio.get_running_loop()
        while True:
            if peer.session is not None and not peer.session.closed:
                return peer.session
            if peer.spec.address is None:  # only the peer can connect: wait for it
                try:
                    async with asyncio.timeout_at(deadline):
                        await peer.arrived.wait()
                except TimeoutError:
                    raise UpstreamUnreachable(f"peer {peer.spec.name} has no tunnel up (it must connect to us)"
                                              ) from None
                continue
            if peer.connecting is None:
                wait = peer.retry_at - loop.time()
                if wait > 0:
                    if loop.time() + wait > deadline:
                        raise UpstreamUnreachable(f"peer {peer.spec.name} unreachable ({peer.last_error}); "
                                                  f"retrying in {wait:.1f}s")
                    await asyncio.sleep(wait)
                    continue
                peer.connecting = loop.create_future()
                task = loop.create_task(self._connect(peer, deadline))
                task.add_done_callback(functools.partial(self._connected, peer))
            connecting = peer.connecting
            try:
                async with asyncio.timeout_at(deadline):
                    return await asyncio.shield(connecting)
            except TimeoutError:
                raise UpstreamTimeout(f"peer {peer.spec.name}: no tunnel within the connect timeout") from None

    def _connected(self, peer: _Peer, task: asyncio.Task[Session]) -> None:
        future, peer.connecting = peer.connecting, None
        assert future is not None
        loop = asyncio.get_running_loop()
        if task.cancelled():
            future.cancel()
            return
        error = task.exception()
        if error is None:
            peer.session = task.result()
            peer.backoff = 0.0
            future.set_result(peer.session)
            log.info("mesh: tunnel to %s (%s) up", peer.spec.name, peer.spec.address)
            return
        peer.last_error = str(error) or type(error).__name__
        peer.backoff = min(max(peer.backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
        peer.retry_at = loop.time() + peer.backoff
        log.warning("mesh: cannot reach %s (%s): %s", peer.spec.name, peer.spec.address, peer.last_error)
        future.set_exception(error if isinstance(error, GateError) else UpstreamUnreachable(
            f"peer {peer.spec.name}: {peer.last_error}"))
        future.exception()  # retrieved: nobody may be waiting any more

    async def _connect(self, peer: _Peer, deadline: float, serve: Serve | None = None) -> Session:
        """A verified session to ``peer``: ours to open streams on, or (``serve``) a reverse tunnel whose
        streams the peer opens and ``serve`` answers."""
        loop = asyncio.get_running_loop()
        assert peer.spec.address is not None
        ctx, check = self.trust.client_context(peer.spec, reverse=serve is not None)
        remaining = max(deadline - loop.time(), 0.001)
        sock = await open_tcp(peer.spec.address, remaining,
                              SocketOptions(self.mark, None) if self.mark is not None else None)

        def lost(session: Session) -> None:
            if peer.session is session:
                peer.session = None
                log.info("mesh: %s to %s closed", "reverse tunnel" if serve else "tunnel", peer.spec.name)

        session: Session | None = None

        def give_up() -> None:
            if session is not None and session.transport is not None:
                session.transport.abort()
            else:
                sock.close()

        try:
            async with asyncio.timeout_at(deadline):
                made = Session(self.trust.mesh, client_side=serve is None, on_lost=lost,
                               on_request=request_handler(self.trust, serve, self.exchanges_for(serve))
                               if serve is not None else None)
                await loop.create_connection(lambda: made, sock=sock, ssl=ctx, server_hostname=peer.spec.name)
                session = made  # (uvloop returns its SSL wrapper as the protocol)
                check.verify(session.peer_der)  # before any stream: a wrong gate never sees a flow
                await session.ready
        except TimeoutError:
            give_up()
            raise UpstreamTimeout(f"peer {peer.spec.name}: TLS/HTTP2 setup not done in time") from None
        except (ssl.SSLError, ConnectionError, OSError) as e:
            give_up()
            raise UpstreamUnreachable(f"peer {peer.spec.name}: {e}") from None
        except BaseException:
            give_up()
            raise
        return session

    def adopt(self, peer_name: str, session: Session) -> None:
        """A reverse tunnel from ``peer_name`` came up (our h2 listener accepted it): flows ``via`` that
        peer now open their streams on it."""
        peer = self.peers[peer_name]
        if peer.session is not None and peer.session is not session:
            peer.session.close()  # the peer reconnected; the old connection is dead or dying
        peer.session = session
        peer.arrived.set()

        def lost(closed: Session) -> None:
            if peer.session is closed:
                peer.session = None
                peer.arrived.clear()
                log.info("mesh: reverse tunnel from %s closed", peer_name)

        session.lost_callbacks.append(lost)

    def status(self) -> list[tuple[str, Endpoint | None, bool, int, str]]:
        """Read-only, for the admin API and the metrics: each configured peer's name, address, whether an
        HTTP/2 tunnel to it is up, the streams open on it, and the last error dialling it."""
        out = []
        for name, peer in self.peers.items():
            session = peer.session
            up = session is not None and not session.closed
            out.append((name, peer.spec.address, up, len(session.bridges) if up and session else 0, peer.last_error))
        return out

    def update_peers(self, trust: Trust) -> tuple[list[str], list[str], list[str]]:
        """A reload's peers: (added, removed, re-keyed). New peers are dialled when a flow first needs them;
        removed and re-keyed ones (another address, ID, certificate or transport) lose their connection, so
        no flow goes on under keys the config no longer trusts; unchanged ones keep theirs and their flows."""
        added: list[str] = []
        removed: list[str] = []
        rekeyed: list[str] = []
        new = {p.name: p for p in trust.peers}
        for name, peer in list(self.peers.items()):
            spec = new.get(name)
            if spec == peer.spec and trust.cert_pem(name) == self.trust.cert_pem(name):
                continue
            (removed if spec is None else rekeyed).append(name)
            del self.peers[name]
            if peer.session is not None:
                peer.session.close()
        for name, spec in new.items():
            if name not in self.peers:
                self.peers[name] = _Peer(spec)
                if name not in rekeyed:
                    added.append(name)
        self.trust = trust
        return added, removed, rekeyed

    def start_reverse(self, serve_for: Callable[[str], Serve]) -> None:
        """Keep a reverse tunnel open to every peer marked ``reverse`` (we are behind NAT): dial it,
        serve the flows it sends, and dial again with backoff whenever the connection ends."""
        for peer in self.peers.values():
            if peer.spec.reverse:
                task = asyncio.get_running_loop().create_task(self._keep_reverse(peer, serve_for(peer.spec.name)))
                self._reverse_tasks.append(task)

    async def _keep_reverse(self, peer: _Peer, serve: Serve) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                session = await self._connect(peer, loop.time() + CONNECT_TIMEOUT, serve)
            except GateError as e:
                peer.backoff = min(max(peer.backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
                log.warning("mesh: reverse tunnel to %s (%s) failed: %s; again in %.1fs", peer.spec.name,
                            peer.spec.address, e, peer.backoff)
                await asyncio.sleep(peer.backoff)
                continue
            peer.backoff = 0.0
            log.info("mesh: reverse tunnel to %s (%s) up", peer.spec.name, peer.spec.address)
            ended = asyncio.Event()
            session.lost_callbacks.append(functools.partial(_set_event, ended))
            if not session.closed:
                await ended.wait()
            log.info("mesh: reverse tunnel to %s closed; dialling again", peer.spec.name)
            await asyncio.sleep(BACKOFF_FIRST)  # a peer that restarts needs a moment to listen again

    def close(self) -> None:
        self._closing = True
        if self.alternative is not None:
            self.alternative.close()
        for task in [*self._reverse_tasks, *self._udp_setups]:
            task.cancel()
        for peer in self.peers.values():
            if peer.session is not None:
                peer.session.close()

