"""What every TCP listener shares: the accept loop, flow limits, routing, dialing, relaying, logging.

A kind only writes ``handle(sock, flow)``: read its handshake, then call ``connect`` and ``relay``
(or answer an error). The accept loop backs off on descriptor exhaustion instead of dying, and stops
accepting while ``max_flows`` flows are open (the kernel backlog holds the rest).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.config import ListenerSpec
from gate.dial import Connect, SocketOptions, literal_family, open_tcp
from gate.errors import ClientProtocolError, GateError, RejectedByRule, UpstreamUnreachable
from gate.flow import Flow
from gate.listeners.sniffing import FirstBytes, ProxyHeaderReader, SniffOutcomes, sniff_at_once
from gate.mesh.dialer import Mesh
from gate.router import Decision, FlowKey, Router
from sniff import proxy_protocol
from splice import Relay, Sweeper, sweep_interval
from tproxy.sockopts import is_local_address, set_transparent, unmap

__all__ = ["Context", "Listener", "Server", "bind_listening_socket", "reset"]

log = logging.getLogger("ugate")

# Errors where accept() failing says "the process or the system is out of something", not "this client".
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_BACKOFF_MAX = 1.0  # seconds; doubles from 10 ms while accept() keeps failing
ACCEPTS_PER_WAKEUP = 64  # bounded so one busy listener cannot starve the relays
BACKLOG = 4096  # capped by net.core.somaxconn


@dataclass(frozen=True)
class Context:
    """What listeners share, built once by the app."""

    router: Router
    access_log: AccessLog
    reuse_port: bool = False
    mark: int | None = None  # SO_MARK of upstream sockets (the capture rules skip it)
    own: frozenset[Endpoint] = frozenset()  # our listeners' addresses: never a destination
    mesh: Mesh | None = None  # tunnels to peer gates (routes with via:)
    sniff_outcomes: SniffOutcomes = field(default_factory=SniffOutcomes)

    @functools.cached_property
    def own_ports(self) -> frozenset[int]:
        return frozenset(e.port for e in self.own)

    def log_flow(self, flow: Flow) -> None:
        """Write the flow's access-log record, once."""
        if not flow.logged:
            flow.logged = True
            if self.access_log.enabled:
                self.access_log.write(flow.record())

    def is_own(self, dst: Endpoint) -> bool:
        """``dst`` is one of our listeners (a flow there would loop back into ugate). Asked per flow,
        so the common answer (a port none of ours listens on) is one set lookup."""
        if dst.port not in self.own_ports:
            return False
        if dst in self.own:
            return True
        wildcard = any(e.port == dst.port and e.host in ("0.0.0.0", "::") for e in self.own)
        return wildcard and literal_family(dst.host) is not None and is_local_address(dst.host)


class Server(Protocol):
    """What the app needs of a listener of any kind (TCP or UDP)."""

    def start(self) -> None: ...

    def stop_accepting(self) -> None: ...

    async def drain(self, timeout: float) -> None: ...


def bind_listening_socket(at: Endpoint, *, reuse_port: bool = False, transparent: bool = False) -> socket.socket:
    """A non-blocking listening socket; IPv6 sockets are v6-only so v4 and v6 listeners never collide.

    ``reuse_port``: several worker processes each bind the same port and the kernel spreads new
    connections across them (SO_REUSEPORT).
    """
    infos = socket.getaddrinfo(at.host, at.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted sockets inherit TCP_NODELAY from the listener: one setsockopt less per flow
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            set_transparent(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def reset(sock: socket.socket) -> None:
    """Make the coming close() send RST instead of FIN (SO_LINGER with a zero timeout)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _proxy_header(flow: Flow, decision: Decision, upstream: socket.socket) -> bytes:
    """The PROXY protocol header a route asks for: the client, and the address actually dialled."""
    version = decision.route.proxy_protocol if decision.route is not None else None
    if version is None:
        return b""
    source = (flow.client.host, flow.client.port)
    try:
        peer = upstream.getpeername()
    except OSError:
        peer = None
    if peer is None or (":" in source[0]) != (":" in peer[0]):  # families differ: say "unknown"
        return b"PROXY UNKNOWN\r\n" if version == "v1" else proxy_protocol.V2_SIGNATURE + b"\x20\x00\x00\x00"
    destination = (peer[0], peer[1])
    return proxy_protocol.build_v1(source, destination) if version == "v1" else proxy_protocol.build_v2(
        source, destination)


def _send_some(sock: socket.socket, data: bytes) -> int:
    """Send what ``sock`` takes now without waiting (errors surface later, in the relay)."""
    try:
        return sock.send(data)
    except OSError:
        return 0


def _endpoint(addr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
    return Endpoint(addr[0], addr[1])


class Listener:
    """Base of the TCP listener kinds; subclasses implement ``handle``."""

    transparent: ClassVar[bool] = False  # IP_TRANSPARENT listening socket (TPROXY)

    def __init__(self, spec: ListenerSpec, ctx: Context) -> None:
        self.spec = spec
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self._accepting = False
        self._backoff = 0.0
        self._handshakes: set[asyncio.Task[None]] = set()
        self._relays: set[Relay] = set()
        self._connecting: dict[Connect, tuple[socket.socket, Flow]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        # Coarse shared timers for idle relays and pending connects (cheaper than one per flow).
        self._idle_sweeper = Sweeper(self.loop, sweep_interval(spec.timeouts.idle))
        self._connect_sweeper = Sweeper(self.loop, sweep_interval(spec.timeouts.connect))
        self._sniff_sweeper = Sweeper(self.loop, sweep_interval(spec.timeouts.sniff))
        self._sniffing: dict[FirstBytes | ProxyHeaderReader, socket.socket] = {}
        self._sniff_soon = 0  # accepted flows whose sniffing is scheduled (see route_without_handshake)

    @property
    def active(self) -> int:
        return (len(self._handshakes) + len(self._sniffing) + len(self._connecting) + len(self._relays)
                + self._sniff_soon)

    def start(self) -> None:
        self.sock = bind_listening_socket(self.spec.listen, reuse_port=self.ctx.reuse_port,
                                          transparent=self.transparent)
        self._resume_accepting()
        log.info("listener %s (%s) on %s", self.spec.name, self.spec.kind, self.spec.listen)

    def _resume_accepting(self) -> None:
        if self.sock is not None and not self._accepting and self.active < self.spec.max_flows:
            self.loop.add_reader(self.sock.fileno(), self._on_accept)
            self._accepting = True

    def _pause_accepting(self) -> None:
        if self._accepting and self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self._accepting = False

    def _on_accept(self) -> None:
        assert self.sock is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as e:
                if e.errno not in _EXHAUSTED:
                    raise
                self._pause_accepting()
                self._backoff = min(max(self._backoff * 2, 0.01), ACCEPT_BACKOFF_MAX)
                log.warning("%s: accept failed (%s); retrying in %.2fs", self.spec.name, e.strerror, self._backoff)
                self.loop.call_later(self._backoff, self._resume_accepting)
                return
            self._backoff = 0.0
            conn.setblocking(False)  # O_NONBLOCK is not inherited through accept(); TCP_NODELAY is
            self._idle.clear()
            flow = Flow(listener=self.spec.name, client=_endpoint(addr))
            if self.spec.proxy_protocol_from and self._from_load_balancer(flow):
                self._read_proxy_header(conn, flow)
            else:
                self.accepted(conn, flow)
            if self.active >= self.spec.max_flows:
                self._pause_accepting()
                break

    def _from_load_balancer(self, flow: Flow) -> bool:
        try:
            ip = ipaddress.ip_address(unmap(flow.client.host))
        except ValueError:
            return False
        return any(ip in net for net in self.spec.proxy_protocol_from)

    def _read_proxy_header(self, conn: socket.socket, flow: Flow) -> None:
        def read(ok: bool) -> None:
            del self._sniffing[reader]
            if ok:
                self.accepted(conn, flow)
            else:
                self.refuse(conn, flow, flow.close_reason)

        reader = ProxyHeaderReader(self.loop, conn, flow, self.spec.timeouts.handshake, self._sniff_sweeper, read)
        self._sniffing[reader] = conn

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        """A client connected: serve it in a task running ``handle`` (kinds without a handshake may
        override this with the callback-only ``connect_and_relay``)."""
        self._handshakes.add(self.loop.create_task(self._serve(conn, flow)))

    async def _serve(self, conn: socket.socket, flow: Flow) -> None:
        try:
            await self.handle(conn, flow)
        except GateError as e:
            flow.close_reason = flow.close_reason if flow.close_reason != "open" else str(e) or type(e).__name__
        except TimeoutError:
            flow.close_reason = "handshake timeout"  # connect timeouts arrive as UpstreamTimeout
        except OSError as e:
            flow.close_reason = f"client error: {e.strerror or type(e).__name__}"
        except asyncio.CancelledError:
            flow.close_reason = "shutdown"
        except Exception:
            log.exception("%s: bug while serving %s", self.spec.name, flow.client)
            flow.close_reason = "internal error"
        finally:
            task = asyncio.current_task()
            assert task is not None
            self._handshakes.discard(task)
            if flow.relay is None:  # no relay took the sockets over
                self._close_client(conn)
                self._flow_done(flow)

    async def handle(self, conn: socket.socket, flow: Flow) -> None:
        """Read the kind's handshake, then ``connect`` + ``relay``; answer errors in the protocol."""
        raise NotImplementedError

    # -- the shared steps of a flow --------------------------------------------------------------

    def flow_key(self, flow: Flow) -> FlowKey:
        assert flow.dst is not None
        return FlowKey(self.spec.name, flow.client.host, flow.dst.host, flow.dst.port, flow.host, flow.protocol,
                       flow.sni, flow.alpn)

    def decide(self, flow: Flow) -> Decision:
        """Route the flow and record the decision in it."""
        decision = self.ctx.router.decide(self.flow_key(flow))
        flow.rule = decision.rule
        flow.action = decision.action
        flow.upstream = decision.upstream
        return decision

    def socket_options(self, flow: Flow, decision: Decision) -> SocketOptions | None:
        """The upstream socket's mark, and the client's address to leave from when preserving it."""
        preserve = decision.preserve_source or self.spec.preserve_source
        if not preserve and self.ctx.mark is None:
            return None
        return SocketOptions(self.ctx.mark, (flow.client.host, flow.client.port) if preserve else None)

    def route_without_handshake(self, conn: socket.socket, flow: Flow) -> None:
        """For kinds that know the destination at accept (forward, tproxy, redirect): decide and, when
        the target is an address literal, connect and relay without a task; else take ``handle``."""
        assert flow.dst is not None
        if self.ctx.is_own(flow.dst):
            log.warning("%s: %s -> %s refused: destination is one of our listeners", self.spec.name,
                        flow.client, flow.dst)
            self.refuse(conn, flow, "refused: the destination is ugate itself (a loop)")
            return
        if self.spec.sniffs(flow.dst):
            # not at once: a client's first bytes usually follow its handshake by microseconds, and after
            # the rest of this accept batch they are mostly there, so one read settles the sniff without
            # a poll registration and a second wake-up (measured: sniff cost 16% -> 10% of conn/s)
            self._sniff_soon += 1
            self.loop.call_soon(self._sniff_accepted, conn, flow)
        else:
            self._route_accepted(conn, flow)

    def _sniff_accepted(self, conn: socket.socket, flow: Flow) -> None:
        self._sniff_soon -= 1
        self.sniff_then(conn, flow, self.spec.timeouts.sniff, lambda: self._route_accepted(conn, flow))

    def _close_client(self, conn: socket.socket) -> None:
        """Close a client socket the loop may still watch: a sniffer leaves its registration parked
        for the relay to take over (see sniffing.park), so it is dropped here first."""
        if conn.fileno() >= 0:
            self.loop.remove_reader(conn.fileno())
        conn.close()

    def refuse(self, conn: socket.socket, flow: Flow, reason: str) -> None:
        """End a flow before any upstream exists: the client gets a reset, the log the reason."""
        flow.close_reason = reason
        reset(conn)
        self._close_client(conn)
        self._flow_done(flow)

    def sniff_then(self, conn: socket.socket, flow: Flow, wait: float, then: Callable[[], None]) -> None:
        """Classify the flow's first bytes (at most ``wait`` seconds), then ``then()``; a client that
        breaks off meanwhile is closed and logged."""
        settled = sniff_at_once(conn, flow)
        if settled is not None:  # no waiting (and no extra poll registration) needed
            if settled:
                self.ctx.sniff_outcomes.record(flow)
                then()
            else:
                self._close_client(conn)
                self._flow_done(flow)
            return

        def sniffed(ok: bool) -> None:
            del self._sniffing[watcher]
            if ok:
                self.ctx.sniff_outcomes.record(flow, watcher.timed_out)
                then()
            else:
                self._close_client(conn)
                self._flow_done(flow)

        watcher = FirstBytes(self.loop, conn, flow, wait, self._sniff_sweeper, sniffed)
        self._sniffing[watcher] = conn

    def sniffs_in_tunnel(self, flow: Flow) -> bool:
        """For proxies (SOCKS, CONNECT): sniff the tunnel's first bytes before routing? Only when the
        listener sniffs and a route could decide differently on what sniffing finds, since the client
        must then be told "connected" before any upstream exists (it sends nothing until then)."""
        assert flow.dst is not None
        return self.spec.sniffs(flow.dst) and self.ctx.router.needs_sniff(self.flow_key(flow))

    async def sniff_tunnel(self, conn: socket.socket, flow: Flow) -> None:
        """Classify a tunnel's first bytes (bounded wait, as for transparent flows) into ``flow``;
        ClientProtocolError when the client breaks off meanwhile."""
        settled, timed_out = sniff_at_once(conn, flow), False
        if settled is None:
            done: asyncio.Future[bool] = self.loop.create_future()
            # not in self._sniffing: this flow belongs to the handshake task, which drain cancels
            watcher = FirstBytes(self.loop, conn, flow, self.spec.timeouts.sniff, self._sniff_sweeper,
                                 done.set_result)
            try:
                settled = await done
            finally:
                watcher.cancel()  # only does something when we were cancelled (shutdown)
            timed_out = watcher.timed_out
        if not settled:
            raise ClientProtocolError(flow.close_reason if flow.close_reason != "open" else "client went away")
        self.ctx.sniff_outcomes.record(flow, timed_out)

    def _route_accepted(self, conn: socket.socket, flow: Flow) -> None:
        assert flow.dst is not None
        decision = self.decide(flow)
        target = decision.upstream or flow.dst
        family = literal_family(target.host) if decision.action in ("direct", "upstream", "resolve") else None
        if family is None:
            Listener.accepted(self, conn, flow)  # rejects and names to resolve take the general path
        else:
            self.connect_and_relay(conn, flow, decision, family)

    async def connect(self, flow: Flow) -> socket.socket:
        """Route ``flow`` and open its upstream; raise RejectedByRule or an UpstreamError."""
        decision = self.decide(flow)
        if decision.action == "reject":
            flow.close_reason = f"rejected by {decision.rule}"
            raise RejectedByRule(flow.close_reason)
        if decision.action == "via":
            if self.ctx.mesh is None or decision.via is None:
                raise UpstreamUnreachable("via: this gate has no mesh section")
            try:
                return await self.ctx.mesh.open(decision.via, flow, self.spec.timeouts.connect)
            except GateError as e:
                flow.close_reason = f"upstream: {e}"
                raise
        target = decision.upstream or flow.dst
        assert target is not None
        try:
            upstream = await open_tcp(target, self.spec.timeouts.connect, self.socket_options(flow, decision))
        except GateError as e:
            flow.close_reason = f"upstream: {e}"
            raise
        flow.preread = _proxy_header(flow, decision, upstream) + flow.preread
        return upstream

    def connect_and_relay(self, conn: socket.socket, flow: Flow, decision: Decision, family: int) -> None:
        """The no-task path of a flow with nothing to say first: connect to the decided address
        literal by callbacks, then relay (or reset the client). Per-flow cost is what limits the
        connection rate, and a task with its coroutine frames is the largest part of it."""
        target = decision.upstream or flow.dst
        assert target is not None

        def connected(upstream: socket.socket | None, error: GateError | None) -> None:
            del self._connecting[attempt]
            if upstream is None:
                flow.close_reason = f"upstream: {error}"
                reset(conn)
                self._close_client(conn)
                self._flow_done(flow)
            else:
                flow.preread = _proxy_header(flow, decision, upstream) + flow.preread
                sent = _send_some(upstream, flow.preread) if flow.preread else 0
                flow.bytes_up += sent
                flow.preread = flow.preread[sent:]
                if flow.preread:  # the new socket could not take all sniffed bytes at once: a task waits
                    self._handshakes.add(self.loop.create_task(self._serve_relay(conn, flow, upstream)))
                else:
                    self._start_relay(flow, conn, upstream)

        attempt = Connect(self.loop, target, family, self.spec.timeouts.connect, connected, self._connect_sweeper,
                          self.socket_options(flow, decision))
        self._connecting[attempt] = (conn, flow)

    async def connect_and_relay_or_reset(self, conn: socket.socket, flow: Flow) -> None:
        """Connect and relay a flow whose client was already told it is connected (or speaks a protocol
        with no error answer): a failed upstream can only be told by a reset."""
        try:
            upstream = await self.connect(flow)
        except GateError:
            reset(conn)
            raise
        await self.relay(flow, conn, upstream)

    async def _serve_relay(self, conn: socket.socket, flow: Flow, upstream: socket.socket) -> None:
        try:
            await self.relay(flow, conn, upstream)
        except OSError as e:
            flow.close_reason = f"upstream error: {e.strerror}"
        finally:
            task = asyncio.current_task()
            assert task is not None
            self._handshakes.discard(task)
            if flow.relay is None:
                self._close_client(conn)
                self._flow_done(flow)

    async def relay(self, flow: Flow, conn: socket.socket, upstream: socket.socket) -> None:
        """Send what the handshake read ahead, then relay until the flow ends (logged by ``_flow_done``)."""
        if flow.preread:
            try:
                await self.loop.sock_sendall(upstream, flow.preread)
            except BaseException:
                upstream.close()
                raise
            flow.bytes_up += len(flow.preread)
        self._start_relay(flow, conn, upstream)

    def _start_relay(self, flow: Flow, conn: socket.socket, upstream: socket.socket) -> None:
        relay = Relay(
            conn,
            upstream,
            mode=self.spec.relay,
            idle_timeout=self.spec.timeouts.idle,
            on_done=lambda r: self._relay_done(flow, r),
            loop=self.loop,
            sweeper=self._idle_sweeper,
        )
        flow.path = relay.path
        flow.relay = relay
        self._relays.add(relay)
        relay.start()

    def _relay_done(self, flow: Flow, relay: Relay) -> None:
        self._relays.discard(relay)
        flow.path = relay.path  # an "auto" relay may have moved to splice since it started
        flow.relay = None  # the relay's on_done refers to the flow: no cycle left behind
        flow.bytes_up += relay.bytes_up
        flow.bytes_down += relay.bytes_down
        flow.close_reason = relay.close_reason
        self._flow_done(flow)

    def log_flow(self, flow: Flow) -> None:
        self.ctx.log_flow(flow)

    def _flow_done(self, flow: Flow) -> None:
        self.log_flow(flow)
        if self.active == 0:
            self._idle.set()
        self._resume_accepting()

    # -- shutdown ------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self._pause_accepting()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for open flows to end by themselves, then cut the rest."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            pass
        for watcher, conn in list(self._sniffing.items()):
            watcher.cancel()
            del self._sniffing[watcher]
            self._close_client(conn)
            watcher.flow.close_reason = "shutdown"
            self._flow_done(watcher.flow)
        for attempt, (conn, flow) in list(self._connecting.items()):
            attempt.cancel()
            del self._connecting[attempt]
            self._close_client(conn)
            flow.close_reason = "shutdown"
            self._flow_done(flow)
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
        for relay in list(self._relays):
            relay.abort("shutdown")
        for sweeper in (self._idle_sweeper, self._connect_sweeper, self._sniff_sweeper):
            sweeper.close()
