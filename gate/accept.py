"""The one accept loop of every TCP listener kind (h2 included).

Accepts in batches, backs off on descriptor exhaustion (EMFILE/ENFILE/ENOBUFS/ENOMEM) instead of
spinning or dying, stops accepting while ``max_flows`` flows are open (the kernel backlog holds the
rest), and reads the PROXY protocol header of trusted load balancers before a flow is handed on.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable

from gate.addr import Endpoint
from gate.config import ListenerSpec
from gate.deadlines import Sweeper, sweep_interval
from gate.flow import Close, Flow, FlowState
from gate.handoff import LISTENING
from gate.sniffing import ProxyHeaderReader
from tproxy.sockopts import set_transparent, unmap

__all__ = ["ACCEPTS_PER_WAKEUP", "AcceptLoop", "bind_listening_socket"]

log = logging.getLogger("ugate")

# Errors where accept() failing says "the process or the system is out of something", not "this client".
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_BACKOFF_FIRST, ACCEPT_BACKOFF_MAX = 0.01, 1.0  # seconds; doubles while accept() keeps failing
ACCEPTS_PER_WAKEUP = 64  # bounded so one busy listener cannot starve the relays
BACKLOG = 4096  # capped by net.core.somaxconn


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


class AcceptLoop:
    """Accepts the connections of one listener and hands each on as ``(socket, Flow)``.

    ``active()`` counts the listener's open flows (for max_flows); whoever ends a flow calls
    ``ended(flow)``. Connections from ``spec.proxy_protocol_from`` count as open flows while their
    PROXY header is read, and ``on_refused`` gets those whose header is bad or late. With
    ``per_source``, one client address may hold at most ``spec.source_limit`` open flows, of which at
    most ``spec.max_handshakes_per_source`` not routed yet (whoever routes a flow calls ``routed(flow)``);
    past either its new connections are reset at once (counted, and logged at most once a second), so
    the others are still served.
    """

    def __init__(self, spec: ListenerSpec, *, on_flow: Callable[[socket.socket, Flow], None],
                 on_refused: Callable[[socket.socket, Flow], None], active: Callable[[], int],
                 reuse_port: bool = False, transparent: bool = False, per_source: bool = False) -> None:
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self._on_flow = on_flow
        self._on_refused = on_refused
        self._active = active
        self._reuse_port = reuse_port
        self._transparent = transparent
        self._accepting = False
        self._backoff = 0.0
        self._retry: asyncio.TimerHandle | None = None
        self.headers: dict[ProxyHeaderReader, socket.socket] = {}  # PROXY headers being read
        self._per_source = per_source
        self._sources: dict[str, int] = {}  # client address -> its open flows (only when per_source)
        self._pending: dict[str, int] = {}  # client address -> those of its flows not routed yet
        self.refused_per_source = 0
        self._warned_at = -1.0
        self._header_sweeper = Sweeper(self.loop, sweep_interval(spec.timeouts.handshake))

    def start(self) -> None:
        """Listen: on a socket already listening on the address (socket activation, the gate we replace,
        the listener a reload rebuilt: gate.handoff), else on a new one."""
        self.sock = LISTENING.take(self.spec.listen)
        if self.sock is None:
            self.sock = bind_listening_socket(self.spec.listen, reuse_port=self._reuse_port,
                                              transparent=self._transparent)
        elif self._transparent:
            set_transparent(self.sock)  # a socket unit without Transparent=yes would never see TPROXYed flows
        self.resume()

    def release(self) -> socket.socket | None:
        """Stop accepting and give up the listening socket without closing it (its backlog stays queued)
        for a successor: the listener a reload rebuilds, or the process an upgrade starts."""
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        sock, self.sock = self.sock, None
        return sock

    def resume(self) -> None:
        """Accept again if we stopped for max_flows (a flow ended) and are not backing off."""
        if (self.sock is not None and not self._accepting and self._retry is None
                and self._active() < self.spec.max_flows):
            self.loop.add_reader(self.sock.fileno(), self._on_accept)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting and self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self._accepting = False

    def _retry_now(self) -> None:
        self._retry = None
        self.resume()

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
                self._pause()
                self._backoff = min(max(self._backoff * 2, ACCEPT_BACKOFF_FIRST), ACCEPT_BACKOFF_MAX)
                if self._backoff == ACCEPT_BACKOFF_FIRST or self._backoff == ACCEPT_BACKOFF_MAX:
                    # once when it starts and then about once a second: not a line per failed accept
                    log.warning("%s: accept failed (%s); retrying in %.2fs", self.spec.name, e.strerror,
                                self._backoff)
                self._retry = self.loop.call_later(self._backoff, self._retry_now)
                return
            self._backoff = 0.0
            conn.setblocking(False)  # O_NONBLOCK is not inherited through accept(); TCP_NODELAY is
            flow = Flow(listener=self.spec.name, client=Endpoint(addr[0], addr[1]))
            if self.spec.proxy_protocol_from and self._from_load_balancer(flow):
                self._read_proxy_header(conn, flow)
            elif self._per_source and (limit := self._count(addr[0], flow)):
                self._refuse_source(conn, addr[0], limit)
            else:
                self._on_flow(conn, flow)
            if self._active() >= self.spec.max_flows:
                self._pause()
                break

    def _count(self, source: str, flow: Flow) -> str | None:
        """Count a new flow of ``source`` (and its pending handshake); else which limit it is at."""
        held = self._sources.get(source, 0)
        if held >= self.spec.source_limit:
            return f"{held} open flows (max_flows_per_source)"
        pending = self._pending.get(source, 0)
        if pending >= self.spec.max_handshakes_per_source:
            return f"{pending} pending handshakes (max_handshakes_per_source)"
        self._sources[source] = held + 1
        self._pending[source] = pending + 1
        flow.counted_as, flow.pending = source, True
        return None

    def routed(self, flow: Flow) -> None:
        """``flow`` is past its handshake: it no longer counts among its source's pending ones."""
        if flow.pending:
            flow.pending = False
            _uncount(self._pending, flow.counted_as)

    def ended(self, flow: Flow) -> None:
        """A flow of this listener ended: its source's counts drop, and accepting may resume."""
        self.routed(flow)
        source, flow.counted_as = flow.counted_as, None  # (None: never counted, or already uncounted)
        if source is not None:
            _uncount(self._sources, source)
        self.resume()

    def _refuse_source(self, conn: socket.socket, source: str, limit: str) -> None:
        self.refused_per_source += 1
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        conn.close()
        now = self.loop.time()
        if now - self._warned_at >= 1.0:
            self._warned_at = now
            log.warning("%s: %s holds %s: new ones are reset (%d so far)", self.spec.name, source, limit,
                        self.refused_per_source)

    def _from_load_balancer(self, flow: Flow) -> bool:
        try:
            ip = ipaddress.ip_address(unmap(flow.client.host))
        except ValueError:
            return False
        return any(ip in net for net in self.spec.proxy_protocol_from)

    def _read_proxy_header(self, conn: socket.socket, flow: Flow) -> None:
        flow.state = FlowState.HANDSHAKE

        def read(ok: bool) -> None:
            del self.headers[reader]
            if ok:
                self._on_flow(conn, flow)
            else:
                self._on_refused(conn, flow)

        reader = ProxyHeaderReader(self.loop, conn, flow, self.spec.timeouts.handshake, self._header_sweeper, read)
        self.headers[reader] = conn

    def stop(self) -> None:
        """Stop accepting and close the listening socket (open flows go on)."""
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def cut(self) -> list[tuple[socket.socket, Flow]]:
        """Shutdown: stop reading PROXY headers; returns those connections for the caller to end."""
        cut = []
        for reader, conn in list(self.headers.items()):
            reader.cancel()
            reader.flow.closing(Close.SHUTDOWN)
            cut.append((conn, reader.flow))
        self.headers.clear()
        self._header_sweeper.close()
        return cut


def _uncount(counts: dict[str, int], source: str | None) -> None:
    """One less for ``source``; sources at zero leave the dict (it holds only active sources)."""
    assert source is not None
    held = counts[source] - 1
    if held:
        counts[source] = held
    else:
        del counts[source]
