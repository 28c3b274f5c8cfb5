"""Transparent UDP (``tproxy_udp``): datagrams TPROXY steered to us, relayed per client session.

Each datagram's original destination comes from IP_RECVORIGDSTADDR. A session (per client, or per client
and destination with ``mapping: symmetric``) owns one upstream socket, marked so capture skips it.
Answers go back to the client from a socket bound (IP_TRANSPARENT) to the address the client sent to, so
the client sees the server's address; that socket is connected to the client, and the kernel then also
hands it the client's next datagrams to that address, which are relayed like the first. A session ends
after ``session_timeout`` seconds without a datagram either way, with one access-log record.
A session is routed on its first datagram, classified; a QUIC Initial whose ClientHello continues in
the next datagrams (Chromium splits its hello) is held until the hello is whole, for at most
``timeouts.sniff`` seconds and ``sniff.quic.MAX_DATAGRAMS`` datagrams, then routed and relayed in order.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from gate.addr import Endpoint
from gate.config import TproxyUdpSpec
from gate.flow import Flow
from gate.listeners.base import Context
from gate.listeners.sniffing import apply_sniffed
from gate.router import FlowKey
from sniff import NeedMore, Sniffed, classify_datagrams
from splice import Sweeper, mmsg, sweep_interval
from tproxy.sockopts import parse_origdst, set_big_buffers, set_mark, set_recv_origdst, set_transparent, unmap

__all__ = ["TproxyUdpListener"]

log = logging.getLogger("ugate")

MAX_DATAGRAM = 65535  # the largest UDP payload; one buffer of this size is reused for every read
DATAGRAMS_PER_WAKEUP = 128  # fairness between sockets, and fewer wake-ups per datagram under load
ANCILLARY_SIZE = socket.CMSG_SPACE(28)  # one sockaddr_in6 (the larger of the two)
# Datagrams held (all sessions) while their QUIC ClientHello is incomplete: Initial keys are public, so
# anyone can craft "incomplete" Initials; past this, new sessions are routed at once without the name.
MAX_HELD_BYTES = 4 << 20
BATCHES_PER_WAKEUP = 4  # of up to BATCH_SIZE datagrams each
BATCH_SIZE = 32  # x MAX_DATAGRAM bytes: 2 MiB, allocated once per process on first use

_buffer = bytearray(MAX_DATAGRAM)
_view = memoryview(_buffer)
_batches: list[mmsg.DatagramBatch] = []


def _batch() -> mmsg.DatagramBatch | None:
    """The process's one batch (the loop is single-threaded), or None without recvmmsg."""
    if not _batches and mmsg.available():
        _batches.append(mmsg.DatagramBatch(BATCH_SIZE, MAX_DATAGRAM, segments=True))
    return _batches[0] if _batches else None


SessionKey = tuple[Endpoint, Endpoint | None]  # (client, destination), or (client, None) when full-cone


class _Held:
    """The first datagrams of a session not routed yet (its QUIC ClientHello is incomplete)."""

    __slots__ = ("client", "datagrams", "timer")

    def __init__(self, client: Endpoint, datagrams: list[tuple[Endpoint, bytes]], timer: asyncio.TimerHandle) -> None:
        self.client = client
        self.datagrams = datagrams  # (original destination, payload), in order
        self.timer = timer


def _addr(e: Endpoint) -> tuple[str, int]:
    return (e.host, e.port)


class _Session:
    """One client's (or client and destination's) relay state; expires through the sweeper."""

    __slots__ = ("by_remote", "client", "dst", "flow", "key", "last_active", "listener", "replies", "seen",
                 "sockaddrs", "target", "timeout", "upstream")

    def __init__(self, listener: TproxyUdpListener, key: SessionKey, flow: Flow, target: Endpoint | None,
                 upstream: socket.socket):
        self.listener = listener
        self.key = key
        self.flow = flow
        assert flow.dst is not None
        self.client = flow.client
        self.dst = flow.dst
        self.target = target  # a fixed upstream from the route, else None: each datagram's own destination
        self.upstream = upstream
        self.replies: dict[Endpoint, socket.socket] = {}  # remote the client sees -> socket answering as it
        self.by_remote: dict[tuple[str, int], socket.socket] = {}  # the same, by raw recvfrom() address
        self.sockaddrs: dict[Endpoint, bytes] = {}  # packed destinations for sendmmsg
        self.timeout = listener.spec.session_timeout
        self.last_active = listener.loop.time()
        self.seen = 0

    def deadline(self) -> float:
        """Activity is read off the byte counters here, once per sweep, not stamped per datagram."""
        total = self.flow.bytes_up + self.flow.bytes_down
        if total != self.seen:
            self.seen = total
            self.last_active = self.listener.loop.time()
        return self.last_active + self.timeout

    def expire(self) -> None:
        self.listener.end(self, "idle timeout")


class TproxyUdpListener:
    """Serves one address family's TPROXY UDP port; same lifecycle as the TCP listeners."""

    def __init__(self, spec: TproxyUdpSpec, ctx: Context) -> None:
        self.spec = spec
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.family = socket.AF_INET6 if ":" in spec.listen.host else socket.AF_INET
        self.sessions: dict[SessionKey, _Session] = {}
        self.held: dict[SessionKey, _Held] = {}
        self.held_bytes = 0
        self.sweeper = Sweeper(self.loop, sweep_interval(spec.session_timeout))

    def start(self) -> None:
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
        key = (client, None if self.spec.mapping == "full-cone" else dst)
        session = self.sessions.get(key)
        if session is None:
            self._first_datagrams(key, client, dst, bytes(_view[:n]))
        else:
            self._send_up(session, dst, _view[:n])

    def _send_up(self, session: _Session, dst: Endpoint, data: bytes | memoryview) -> None:
        target = session.target or dst
        try:
            session.upstream.sendto(data, _addr(target))
        except (BlockingIOError, InterruptedError):
            return  # the upstream socket's buffer is full: dropped, as a router would
        except OSError as e:
            log.debug("%s: send to %s: %s", self.spec.name, target, e)
            return
        session.flow.bytes_up += len(data)

    def _first_datagrams(self, key: SessionKey, client: Endpoint, dst: Endpoint, data: bytes) -> None:
        """A datagram of a client without a session: classify the session's datagrams so far (STUN, DNS,
        QUIC with SNI, DTLS, WireGuard), then open it and relay them, or hold them for the rest of a
        QUIC ClientHello."""
        held = self._unhold(key)
        datagrams = [*held.datagrams, (dst, data)] if held is not None else [(dst, data)]
        found = classify_datagrams([payload for _, payload in datagrams])
        if isinstance(found, NeedMore):
            size = sum(len(payload) for _, payload in datagrams)
            if len(self.held) < self.spec.max_flows and self.held_bytes + size <= MAX_HELD_BYTES:
                timer = held.timer if held is not None else self.loop.call_later(
                    self.spec.timeouts.sniff, self._hold_expired, key)
                self.held[key] = _Held(client, datagrams, timer)
                self.held_bytes += size
                return
            found = Sniffed("quic")  # no room to wait: route on what is known
        if held is not None:
            held.timer.cancel()
        self._open_and_relay(key, client, datagrams, found, timed_out=False)

    def _unhold(self, key: SessionKey) -> _Held | None:
        held = self.held.pop(key, None)
        if held is not None:
            self.held_bytes -= sum(len(payload) for _, payload in held.datagrams)
        return held

    def _hold_expired(self, key: SessionKey) -> None:
        """The rest of the ClientHello did not come in time (lost, or never sent): route without it."""
        held = self._unhold(key)
        assert held is not None  # a held session's timer is cancelled whenever it leaves self.held
        self._open_and_relay(key, held.client, held.datagrams, Sniffed("quic"), timed_out=True)

    def _open_and_relay(self, key: SessionKey, client: Endpoint, datagrams: list[tuple[Endpoint, bytes]],
                        found: Sniffed, timed_out: bool) -> None:
        session = self._open(key, client, datagrams[0][0], found, timed_out)
        if session is not None:
            for dst, payload in datagrams:
                self._send_up(session, dst, payload)

    def _open(self, key: SessionKey, client: Endpoint, dst: Endpoint, found: Sniffed,
              timed_out: bool) -> _Session | None:
        flow = Flow(listener=self.spec.name, client=client, dst=dst, path="udp")
        if self.ctx.is_own(dst):
            flow.close_reason = "refused: the destination is ugate itself (a loop)"
            self._log(flow)
            return None
        apply_sniffed(flow, found)
        self.ctx.sniff_outcomes.record(flow, timed_out)
        decision = self.ctx.router.decide(FlowKey(self.spec.name, client.host, dst.host, dst.port, found.host,
                                                  found.protocol, found.sni, found.alpn))
        # "resolve" is for TCP flows: a UDP session opens on its first datagram without waiting on DNS,
        # so it goes to the original destination
        target = decision.upstream if decision.action == "upstream" else None
        flow.rule, flow.action, flow.upstream = decision.rule, decision.action, target
        if decision.action == "reject" or len(self.sessions) >= self.spec.max_flows:
            flow.close_reason = f"rejected by {decision.rule}" if decision.action == "reject" else "max_flows reached"
            self._log(flow)  # one record per refused datagram: a client retrying shows as retries
            return None
        family = socket.AF_INET6 if ":" in (target or dst).host else socket.AF_INET
        upstream = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            if self.ctx.mark is not None:
                set_mark(upstream, self.ctx.mark)
            set_big_buffers(upstream)
            upstream.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        except OSError as e:
            upstream.close()
            log.warning("%s: no upstream socket for %s: %s", self.spec.name, client, e)
            return None
        session = _Session(self, key, flow, target, upstream)
        self.sessions[key] = session
        self.loop.add_reader(upstream.fileno(), self._on_upstream, session, key)
        self.sweeper.add(session)
        return session

    # -- upstream -> client ----------------------------------------------------------------------

    def _on_upstream(self, session: _Session, key: SessionKey) -> None:
        """Answers for the client; the hot loop knows each remote's reply socket by its raw address."""
        upstream, by_remote, total = session.upstream, session.by_remote, 0
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                n, remote = upstream.recvfrom_into(_buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # ICMP port unreachable and the like
                log.debug("%s: upstream recv: %s", self.spec.name, e)
                continue
            reply = by_remote.get(remote[:2]) or self._reply_for(session, key, remote[:2])
            if reply is None:
                continue
            try:
                reply.send(_view[:n])
            except OSError as e:
                log.debug("%s: reply to %s: %s", self.spec.name, session.client, e)
                continue
            total += n
        session.flow.bytes_down += total

    def _reply_for(self, session: _Session, key: SessionKey, remote: tuple[str, int]) -> socket.socket | None:
        if session.target is not None:
            source = session.dst  # answers of a fixed upstream appear to come from where the client sent
        else:
            source = Endpoint(unmap(remote[0]), remote[1])
            if key[1] is not None and source != key[1]:
                return None  # symmetric mapping: only the destination may answer
        reply = session.replies.get(source) or self._reply_socket(session, source)
        if reply is not None:
            session.by_remote[remote] = reply
        return reply

    def _reply_socket(self, session: _Session, source: Endpoint) -> socket.socket | None:
        """A socket bound to ``source`` (not ours: IP_TRANSPARENT) and connected to the client."""
        family = socket.AF_INET6 if ":" in source.host else socket.AF_INET
        if family != self.family:
            return None  # cannot answer an IPv4 client from an IPv6 address
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # other clients' sessions share it
            set_transparent(sock)
            set_big_buffers(sock)
            if self.ctx.mark is not None:
                set_mark(sock, self.ctx.mark)
            sock.bind(_addr(source))
            sock.connect(_addr(session.client))
            if _batch() is not None:  # read only through the batch, which keeps coalesced datagrams whole
                mmsg.enable_gro(sock)
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
        batch = _batch()
        if batch is None:
            self._relay_one_by_one(session, source, sock)
            return
        target = session.target or source
        dest = session.sockaddrs.get(target) or session.sockaddrs.setdefault(target, mmsg.sockaddr(*_addr(target)))
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
                batch.send(dst_fd, n, dest)
            except OSError:
                pass  # refused or unroutable: dropped, as a router would
        session.flow.bytes_up += total

    def _relay_one_by_one(self, session: _Session, source: Endpoint, sock: socket.socket) -> None:
        upstream, to, total = session.upstream, _addr(session.target or source), 0
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                n = sock.recv_into(_buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            try:
                upstream.sendto(_view[:n], to)
            except OSError:
                continue  # full or refused: dropped, as a router would
            total += n
        session.flow.bytes_up += total

    # -- ending ----------------------------------------------------------------------------------

    def end(self, session: _Session, reason: str) -> None:
        self.sessions.pop(session.key, None)
        self.sweeper.discard(session)
        for sock in (session.upstream, *session.replies.values()):
            self.loop.remove_reader(sock.fileno())
            sock.close()
        session.replies.clear()
        session.flow.close_reason = reason
        self._log(session.flow)

    def _log(self, flow: Flow) -> None:
        if self.ctx.access_log.enabled:
            self.ctx.access_log.write(flow.record())

    def stop_accepting(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def drain(self, timeout: float) -> None:
        """UDP has no end of flow to wait for: sessions end now, each with its record (held datagrams of
        sessions not routed yet are dropped: their client retransmits to whoever serves next)."""
        for held in self.held.values():
            held.timer.cancel()
        self.held.clear()
        self.held_bytes = 0
        for session in list(self.sessions.values()):
            self.end(session, "shutdown")
        self.sweeper.close()

