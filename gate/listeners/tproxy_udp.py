"""Transparent UDP (``tproxy_udp``): datagrams TPROXY steered to us, relayed per client session.

Each datagram's original destination comes from IP_RECVORIGDSTADDR. A session (per client, or per client
and destination with ``mapping: symmetric``) owns one upstream socket, marked so capture skips it.
Answers go back to the client from a socket bound (IP_TRANSPARENT) to the address the client sent to, so
the client sees the server's address; that socket is connected to the client, and the kernel then also
hands it the client's next datagrams to that address, which are relayed like the first.
Which sessions exist, the hold of a QUIC Initial whose ClientHello continues in later datagrams, the
idle expiry and the caps (sessions per client address, reply sockets per session and per listener) are
decided by
``gate.udp.SessionTable``; this module is its I/O shell: sockets, the clock, routing, relaying and the
access log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket

from gate.addr import Endpoint
from gate.config import TproxyUdpSpec
from gate.context import Context
from gate.errors import GateError, RefusedByPolicy
from gate.flow import Close, Flow, FlowState
from gate.mesh.udp_via import ViaUdp
from gate.sniffing import apply_sniffed
from gate.udp import Expired, Key, Open, Relay, SessionTable, reply_source
from gate.udp.offload import UdpOffload
from gate.udp.sessions import Refuse, RemoteVerdict
from gate.udp.timer import TableTimer
from gate.upstream import Opener
from splice import mmsg
from tproxy.sockopts import parse_origdst, set_big_buffers, set_mark, set_recv_origdst, set_transparent, unmap

__all__ = ["TproxyUdpListener"]

log = logging.getLogger("ugate")

MAX_DATAGRAM = 65535  # the largest UDP payload; one buffer of this size is reused for every read
DATAGRAMS_PER_WAKEUP = 128  # fairness between sockets, and fewer wake-ups per datagram under load
ANCILLARY_SIZE = socket.CMSG_SPACE(28)  # one sockaddr_in6 (the larger of the two)
BATCHES_PER_WAKEUP = 4  # of up to BATCH_SIZE datagrams each
BATCH_SIZE = 32  # x MAX_DATAGRAM bytes: 2 MiB, allocated once per process on first use

_buffer = bytearray(MAX_DATAGRAM)
_view = memoryview(_buffer)
_batches: dict[bool, mmsg.DatagramBatch] = {}


def _batch(sources: bool = False) -> mmsg.DatagramBatch:
    """The process's batch (the loop is single-threaded) for connected sockets, or with ``sources`` the
    one for upstream sockets, which answer from several remotes."""
    if sources not in _batches:
        _batches[sources] = mmsg.DatagramBatch(BATCH_SIZE, MAX_DATAGRAM, segments=True, sources=sources)
    return _batches[sources]


def _addr(e: Endpoint) -> tuple[str, int]:
    return (e.host, e.port)


class _Session:
    """One client's (or client and destination's) sockets and flow record; the table keeps its state."""

    __slots__ = ("by_remote", "by_sockaddr", "client", "coalesce", "dst", "flow", "key", "replies", "sockaddrs",
                 "target", "upstream", "via")

    def __init__(self, key: Key, flow: Flow, target: Endpoint | None, upstream: socket.socket | None,
                 via: ViaUdp | None = None):
        self.key = key
        self.flow = flow
        assert flow.dst is not None
        self.client = flow.client
        self.dst = flow.dst
        self.target = target  # a fixed upstream from the route, else None: each datagram's own destination
        self.upstream = upstream  # None for a session routed via a mesh peer, which has ``via`` instead
        self.via = via
        self.replies: dict[Endpoint, socket.socket] = {}  # remote the client sees -> socket answering as it
        # the same, by raw recvfrom() address: a cache, filled up to max_remotes_per_session entries (a
        # fixed upstream answers through one socket, but from as many addresses as write to its port)
        self.by_remote: dict[tuple[str, int], socket.socket] = {}
        self.by_sockaddr: dict[bytes, socket.socket] = {}  # the same by raw sockaddr, for batched answers
        self.sockaddrs: dict[Endpoint, bytes] = {}  # packed destinations for sendmmsg
        self.coalesce = True  # equal-sized datagrams leave as one segmented send, until the path refuses it

    @property
    def bytes_up(self) -> int:
        """Read by the table once per sweep (what keeps the session open): the relay paths only add."""
        return self.flow.bytes_up


class TproxyUdpListener:
    """Serves one address family's TPROXY UDP port; same lifecycle as the TCP listeners. The I/O shell
    of a ``SessionTable``: it reads sockets and the clock, routes, relays and logs; the table decides."""

    def __init__(self, spec: TproxyUdpSpec, ctx: Context) -> None:
        self.spec = spec
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.family = socket.AF_INET6 if ":" in spec.listen.host else socket.AF_INET
        self.table: SessionTable[_Session] = SessionTable(
            spec.mapping, spec.session_timeout, spec.timeouts.sniff, spec.max_flows,
            max_sessions_per_client=spec.max_sessions_per_client,
            max_remotes_per_session=spec.max_remotes_per_session, max_reply_sockets=spec.max_reply_sockets)
        self.sessions = self.table.sessions  # the open sessions, looked up per datagram
        self.full_cone = self.table.mapping == "full-cone"
        self.timer = TableTimer(self.loop, self.table, self._act)
        self.opener = Opener(ctx, spec.name, spec.timeouts.connect, preserve_source=spec.preserve_source)
        # sessions handed to the kernel once routed (gate.udp.offload)
        self.offload = UdpOffload(self.loop, 6 if self.family == socket.AF_INET6 else 4, spec.session_timeout,
                                  ctx.finish)

    def start(self) -> None:
        if not mmsg.available():  # glibc and musl have them; the relay's hot paths are built on them
            raise OSError(f"{self.spec.name}: tproxy_udp needs recvmmsg/sendmmsg, which this C library lacks")
        sock = socket.socket(self.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.ctx.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            set_transparent(sock)
            set_big_buffers(sock)
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            set_recv_origdst(sock)
            sock.bind(_addr(self.spec.listen))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_listener)
        log.info("listener %s (%s, %s) on %s", self.spec.name, self.spec.kind, self.spec.mapping, self.spec.listen)

    # -- client -> upstream ----------------------------------------------------------------------

    def _on_listener(self) -> None:
        assert self.sock is not None
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                n, ancdata, _, peer = self.sock.recvmsg_into([_buffer], ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. an ICMP error queued on the socket
                log.debug("%s: recvmsg: %s", self.spec.name, e)
                continue
            origdst = parse_origdst(ancdata)
            if origdst is not None:
                self._from_client(Endpoint(unmap(peer[0]), peer[1]), Endpoint(*origdst), n)

    def _from_client(self, client: Endpoint, dst: Endpoint, n: int) -> None:
        # the table's key(), inlined: an open session's datagrams cost one dict lookup, no call
        session = self.sessions.get((client, None if self.full_cone else dst))
        if session is not None:
            self._send_up(session, dst, _view[:n])
            return
        self._act(self.table.datagram(client, dst, bytes(_view[:n]), self.loop.time()))
        self.timer.schedule()

    def _send_up(self, session: _Session, dst: Endpoint, data: bytes | memoryview) -> None:
        if session.via is not None:
            if session.via.send(dst, data):
                session.flow.bytes_up += len(data)
            return
        assert session.upstream is not None
        target = session.target or dst
        try:
            session.upstream.sendto(data, _addr(target))
        except (BlockingIOError, InterruptedError):
            return  # the upstream socket's buffer is full: dropped, as a router would
        except OSError as e:
            log.debug("%s: send to %s: %s", self.spec.name, target, e)
            return
        session.flow.bytes_up += len(data)

    # -- the table's decisions -------------------------------------------------------------------

    def _act(self, action: Relay[_Session] | Open | Expired[_Session] | Refuse | None) -> None:
        if isinstance(action, Open):
            self._open(action)
        elif isinstance(action, Relay):
            self._send_up(action.session, action.dst, action.payload)
        elif isinstance(action, Expired):
            self._close(action.session, Close.IDLE)
        elif isinstance(action, Refuse):
            self._refuse(action)

    def _open(self, o: Open) -> None:
        """Route the session the table opens (classified on its first datagrams: STUN, DNS, QUIC with
        SNI, DTLS, WireGuard), give it an upstream socket and relay its datagrams, or refuse it."""
        flow = self.ctx.begin(Flow(listener=self.spec.name, client=o.client, dst=o.dst, path="udp"))
        apply_sniffed(flow, o.sniffed)
        self.ctx.sniff_outcomes.record(flow, o.timed_out)
        try:
            decision = self.opener.decide(flow)
            if len(self.sessions) >= self.spec.max_flows:
                raise RefusedByPolicy("max_flows reached")
            # a session the kernel takes over keeps its upstream unconnected: a connected UDP socket gets
            # the first answer by early demux, however the fast path rule accepted it
            offload = self.offload.wants(decision)
            upstream = self.opener.open_udp(decision, flow, connect=not (self.full_cone or offload))
        except GateError as e:
            self.table.refused(o.key)
            self.ctx.finish(flow, e.close, str(e))  # one record per refused datagram: retries show as such
            return
        flow.state = FlowState.RELAYING
        if isinstance(upstream, ViaUdp):
            self._open_via(o, flow, upstream)
            return
        session = _Session(o.key, flow, flow.upstream, upstream.sock)
        mmsg.enable_gro(upstream.sock)  # read only through the batch, which keeps coalesced answers whole
        late = self.table.opened(o.key, session, self.loop.time())
        self.loop.add_reader(upstream.sock.fileno(), self._on_upstream, session, o.key)
        # before the first datagrams go: the first answer may come back sooner than an nft commit takes
        offloaded = offload and self.offload.offer(decision, flow)
        for dst, payload in (*o.datagrams, *late):
            self._send_up(session, dst, payload)
        if offloaded:
            # the kernel forwards the rest; our sockets must go, as the kernel would hand them (by their
            # exact addresses) the packets it is to forward. The offload ends the flow and logs it.
            self.table.end(o.key)
            self._release(session)

    def _open_via(self, o: Open, flow: Flow, via: ViaUdp) -> None:
        """A session routed via a mesh peer: one CONNECT-UDP stream per destination (as many as it may
        have remotes), answers to the client through the same reply sockets as a direct session's."""
        session = _Session(o.key, flow, None, None, via)
        via.max_destinations = self.table.max_remotes_per_session
        via.on_datagram = functools.partial(self._from_tunnel, session)
        via.on_end = functools.partial(self._via_ended, session)
        late = self.table.opened(o.key, session, self.loop.time())
        for dst, payload in (*o.datagrams, *late):
            self._send_up(session, dst, payload)

    def _refuse(self, r: Refuse) -> None:
        """A client address at its session cap: one log line and one access-log record for the refusals
        the table reports (the first, then at most one per session_timeout), not one per datagram."""
        cap = self.table.max_sessions_per_client
        log.warning("%s: %s has %d sessions (max_sessions_per_client): %d new session(s) refused",
                    self.spec.name, r.client.host, cap, r.refused)
        flow = self.ctx.begin(Flow(listener=self.spec.name, client=r.client, dst=r.dst, path="udp"))
        error = RefusedByPolicy(f"max_sessions_per_client ({cap}) reached; {r.refused} datagram(s) refused")
        self.ctx.finish(flow, error.close, str(error))

    # -- upstream -> client ----------------------------------------------------------------------

    def _on_upstream(self, session: _Session, key: Key) -> None:
        """Answers for the client, in batches: each run of answers from one remote goes to that remote's
        reply socket in one sendmmsg (coalesced as the client's datagrams are: a QUIC download's packets
        leave in segmented runs)."""
        batch = _batch(sources=True)
        assert session.upstream is not None  # read only for direct sessions
        upstream_fd, by_sockaddr, total = session.upstream.fileno(), session.by_sockaddr, 0
        for _ in range(BATCHES_PER_WAKEUP):
            try:
                n = batch.recv(upstream_fd)
            except OSError as e:  # ICMP port unreachable and the like; the datagrams behind it wait
                log.debug("%s: upstream recv: %s", self.spec.name, e)
                continue
            if not n:
                break
            i = 0
            while i < n:
                source, j = batch.source(i), i + 1
                while j < n and batch.source(j) == source:
                    j += 1
                reply = by_sockaddr.get(source)
                if reply is None:
                    reply = self._reply_for(session, key, mmsg.address(source))
                    if reply is not None and len(by_sockaddr) < self.table.max_remotes_per_session:
                        by_sockaddr[source] = reply
                if reply is not None:
                    try:
                        batch.send(reply.fileno(), j, None, coalesce=session.coalesce, start=i)
                        total += batch.size(j, i)
                    except OSError as e:
                        log.debug("%s: reply to %s: %s", self.spec.name, session.client, e)
                    if batch.gso_refused:
                        session.coalesce = False
                i = j
        session.flow.bytes_down += total

    def _from_tunnel(self, session: _Session, remote: Endpoint, payload: bytes) -> None:
        """An answer from ``remote`` through the mesh (session routed via a peer)."""
        addr = (remote.host, remote.port)
        reply = session.by_remote.get(addr) or self._reply_for(session, session.key, addr)
        if reply is None:
            return
        try:
            reply.send(payload)
        except OSError as e:
            log.debug("%s: reply to %s: %s", self.spec.name, session.client, e)
            return
        session.flow.bytes_down += len(payload)

    def _via_ended(self, session: _Session, error: GateError) -> None:
        """A stream of a session routed via a peer failed (refused there, tunnel lost): the session
        ends, and the client's next datagram is routed afresh."""
        if self.table.end(session.key) is session:
            self._close(session, error.close, str(error))
            self.timer.schedule()

    def _reply_for(self, session: _Session, key: Key, remote: tuple[str, int]) -> socket.socket | None:
        source = reply_source(key, session.dst, session.target is not None, Endpoint(unmap(remote[0]), remote[1]))
        if source is None or (":" in source.host) != (self.family == socket.AF_INET6):
            return None  # not to be answered, or cannot be: an IPv4 client from an IPv6 address
        reply = session.replies.get(source)
        if reply is None:
            verdict = self.table.new_remote(key, self.loop.time())
            if verdict is not RemoteVerdict.ADMIT:
                if verdict is RemoteVerdict.DROP_FIRST:
                    log.warning("%s: session of %s answers from %d remotes (max_remotes_per_session): answers "
                                "from further remotes are dropped", self.spec.name, session.client,
                                len(session.replies))
                elif verdict is RemoteVerdict.BUDGET_FULL:
                    log.warning("%s: %d reply sockets open (max_reply_sockets): %d answer(s) from remotes "
                                "without one dropped", self.spec.name, self.table.reply_sockets,
                                self.table.reported())
                elif verdict is RemoteVerdict.SHARE_FULL:
                    log.warning("%s: %s holds %d reply sockets (its share of max_reply_sockets): %d answer(s) "
                                "from remotes without one dropped", self.spec.name, session.client.host,
                                self.table.reply_share, self.table.reported())
                return None
            reply = self._reply_socket(session, source)
            if reply is None:
                self.table.reply_closed(key)
        if reply is not None and len(session.by_remote) < self.table.max_remotes_per_session:
            session.by_remote[remote] = reply
        return reply

    def _reply_socket(self, session: _Session, source: Endpoint) -> socket.socket | None:
        """A socket bound to ``source`` (not ours: IP_TRANSPARENT) and connected to the client."""
        sock = socket.socket(self.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # other clients' sessions share it
            set_transparent(sock)
            set_big_buffers(sock)
            if self.ctx.mark is not None:
                set_mark(sock, self.ctx.mark)
            sock.bind(_addr(source))
            sock.connect(_addr(session.client))
            mmsg.enable_gro(sock)  # read only through the batch, which keeps coalesced datagrams whole
        except OSError as e:
            sock.close()
            log.warning("%s: cannot answer %s as %s: %s", self.spec.name, session.client, source, e)
            return None
        session.replies[source] = sock
        self.loop.add_reader(sock.fileno(), self._on_reply, session, source, sock)
        return sock

    def _on_reply(self, session: _Session, source: Endpoint, sock: socket.socket) -> None:
        """The client's next datagrams to ``source`` arrive on the connected reply socket: relay them
        straight to the upstream, in batches (the hot path of a long UDP flow)."""
        if session.via is not None:
            self._relay_via(session, source, sock)
            return
        batch = _batch()
        target = session.target or source
        dest = session.sockaddrs.get(target) or session.sockaddrs.setdefault(target, mmsg.sockaddr(*_addr(target)))
        assert session.upstream is not None
        src_fd, dst_fd, total = sock.fileno(), session.upstream.fileno(), 0
        for _ in range(BATCHES_PER_WAKEUP):
            try:
                n = batch.recv(src_fd)
            except OSError:  # an ICMP error queued on the socket; the datagrams behind it wait
                continue
            if not n:
                break
            total += batch.size(n)
            try:
                batch.send(dst_fd, n, dest, coalesce=session.coalesce)
            except OSError:
                pass  # refused or unroutable: dropped, as a router would
            if batch.gso_refused:
                session.coalesce = False
        session.flow.bytes_up += total

    def _relay_via(self, session: _Session, source: Endpoint, sock: socket.socket) -> None:
        """The client's next datagrams to ``source`` for a session routed via a peer: as capsules."""
        assert session.via is not None
        stream, total = session.via.stream(source), 0  # one destination: looked up once per wake-up
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                n = sock.recv_into(_buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            if stream is not None and stream.send(_view[:n]):
                total += n
        session.flow.bytes_up += total

    # -- ending ----------------------------------------------------------------------------------

    def _close(self, session: _Session, reason: Close, detail: str | None = None) -> None:
        """Close a session that has left the table, with its one access-log record."""
        self._release(session)
        self.ctx.finish(session.flow, reason, detail)

    def _release(self, session: _Session) -> None:
        if session.via is not None:
            session.via.close()
        for sock in (session.upstream, *session.replies.values()):
            if sock is not None:
                self.loop.remove_reader(sock.fileno())
                sock.close()
        session.replies.clear()

    def stop_accepting(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def drain(self, timeout: float) -> None:
        """UDP has no end of flow to wait for: sessions end now, each with its record (held datagrams of
        sessions not routed yet are dropped: their client retransmits to whoever serves next)."""
        for session in self.table.shutdown():
            self._close(session, Close.SHUTDOWN)
        self.offload.shutdown()
        self.timer.schedule()
