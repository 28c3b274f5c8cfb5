"""SOCKS5 UDP ASSOCIATE (RFC 1928 section 7) for the ``socks5`` and ``mux`` listeners.

An association is a relay socket bound to the address the client reached, living exactly as long as its
TCP control connection. Client datagrams carry a SOCKS UDP header (``gate.proto.socks_udp``) naming their
destination; each destination is one session of a ``gate.udp.SessionTable`` (mapping "symmetric", keyed
by destination), which sniffs its first datagrams (DNS, QUIC with SNI, STUN...), holds split QUIC hellos
and expires idle destinations. Each session is one Flow, routed and opened like any other by the shared
Opener; answers come back wrapped in the header, from the relay socket. This module is the I/O shell.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import socket

from gate.addr import Endpoint
from gate.context import Context
from gate.dial import literal_family
from gate.errors import ClientProtocolError, GateError, RefusedByPolicy, UpstreamUnreachable
from gate.flow import Close, Flow, FlowState
from gate.mesh.udp_via import ViaUdp
from gate.proto import socks
from gate.proto.socks import ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6
from gate.proto.socks_udp import SocksUdpError, header, parse_datagram
from gate.sniffing import apply_sniffed
from gate.specs import SocksUdp
from gate.udp import Expired, Key, Open, Relay, SessionTable
from gate.udp.sessions import Refuse
from gate.udp.timer import TableTimer
from gate.upstream import Opener, Upstream
from tproxy.sockopts import set_big_buffers, unmap

__all__ = ["MAX_HELD_BYTES", "Association", "UdpAssociations"]

log = logging.getLogger("ugate")

DATAGRAMS_PER_WAKEUP = 128  # fairness between sockets, and fewer wake-ups per datagram under load
# Datagrams of one association held while a QUIC ClientHello is incomplete, or queued while a destination
# opens (a name resolving): a split Chromium Initial is 2-3 datagrams of 1,250 bytes, so 256 KiB holds
# dozens of such hellos at once, while max_flows associations stay bounded (the table's own default,
# 4 MiB, is sized for one listener, not one client).
MAX_HELD_BYTES = 256 << 10
MAX_UDP = 65507  # the largest IPv4 UDP payload: no wrapped answer may be longer

_HEADER_SIZE = {ATYP_IPV4: 10, ATYP_IPV6: 22}  # RSV FRAG ATYP ADDR PORT; a domain's depends on its length
_buffer = bytearray(65536)  # one read buffer for every socket (the loop is single-threaded)
_view = memoryview(_buffer)


class _Destination:
    """One destination's upstream (a socket connected to it, so only it can answer; or, routed via a
    mesh peer, a CONNECT-UDP stream to it) and flow record."""

    __slots__ = ("asked", "flow", "header", "key", "sock", "target", "via")

    def __init__(self, key: Key, flow: Flow, sock: socket.socket | None, asked: bytes, wrap: bytes,
                 via: ViaUdp | None = None, target: Endpoint | None = None) -> None:
        self.key = key
        self.flow = flow
        self.sock = sock
        self.via = via
        self.target = target  # where ``via`` sends (the destination as the client named it)
        self.asked = asked  # the header of the client's datagrams to it, as it sends them (see _on_client)
        self.header = wrap  # the SOCKS UDP header answers carry

    @property
    def bytes_up(self) -> int:
        return self.flow.bytes_up


class UdpAssociations:
    """A listener's associations: the bounds over all of them, and where each is served."""

    def __init__(self, name: str, spec: SocksUdp, ctx: Context, opener: Opener, idle: float,
                 sniff: float) -> None:
        self.name = name
        self.spec = spec
        self.ctx = ctx
        self.opener = opener
        self.idle = idle  # an association without a client datagram for this long ends
        self.sniff = sniff
        self.per_client: dict[str, int] = {}  # associations by client address
        self.sessions = 0  # upstream sockets of all associations, at most spec.max_sessions
        self.dropped: collections.Counter[str] = collections.Counter()  # over every association

    async def serve(self, conn: socket.socket, flow: Flow, request: socks.Socks5Request) -> None:
        """Grant the association (the handshake and authentication are done), answer with the relay
        socket's address, and relay until the control connection ends."""
        client = flow.client.host
        if self.per_client.get(client, 0) >= self.spec.max_associations_per_client:
            await asyncio.get_running_loop().sock_sendall(conn, socks.socks5_reply(socks.Reply.NOT_ALLOWED))
            raise RefusedByPolicy(f"max_associations_per_client ({self.spec.max_associations_per_client}) reached")
        if flow.preread:  # a client must wait for our reply before it says anything more
            raise ClientProtocolError("bytes after the UDP ASSOCIATE request")
        local = unmap(conn.getsockname()[0])
        try:
            assoc = Association(self, flow, local, request)
        except OSError as e:
            await asyncio.get_running_loop().sock_sendall(conn, socks.socks5_reply(socks.Reply.GENERAL_FAILURE))
            raise UpstreamUnreachable(f"no UDP relay socket: {e.strerror}") from None
        self.per_client[client] = self.per_client.get(client, 0) + 1
        close, detail = Close.SHUTDOWN, None
        try:
            bound = assoc.sock.getsockname()
            await asyncio.get_running_loop().sock_sendall(conn, socks.socks5_reply(socks.Reply.SUCCEEDED, *bound[:2]))
            flow.state = FlowState.RELAYING
            self.opener.on_routed(flow)  # granted: no longer a pending handshake of its source
            close, detail = await assoc.watch(conn)
        except OSError as e:
            close, detail = Close.CLIENT_RESET, e.strerror
        finally:
            assoc.close(close)
            left = self.per_client[client] - 1
            if left:
                self.per_client[client] = left
            else:
                del self.per_client[client]
            flow.bytes_up, flow.bytes_down = assoc.bytes_up, assoc.bytes_down
            flow.closing(close, assoc.summary(detail))


class Association:
    """One UDP ASSOCIATE: its relay socket, its client's address, its destinations (a SessionTable)."""

    def __init__(self, owner: UdpAssociations, control: Flow, local: str, request: socks.Socks5Request) -> None:
        self.owner = owner
        self.ctx = owner.ctx
        self.spec = owner.spec
        self.loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in local else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            set_big_buffers(self.sock)  # every destination's datagrams share this one socket's queues
            self.sock.bind((local, 0))  # the address the client reached, so the client can reach it
        except OSError:
            self.sock.close()
            raise
        # datagrams only from the control connection's address, and from the port the request named
        # (most clients name theirs) or, if it named none, the port of the first datagram
        self.client_host = unmap(control.client.host)  # as recvfrom() on the relay socket will say it
        self.client_port = request.port
        self.client = Endpoint(self.client_host, self.client_port)
        self.table: SessionTable[_Destination] = SessionTable(
            "symmetric", self.spec.session_timeout, owner.sniff, self.spec.max_destinations,
            max_held_bytes=MAX_HELD_BYTES, max_sessions_per_client=self.spec.max_destinations)
        self.sessions = self.table.sessions
        self.by_header: dict[bytes, _Destination] = {}  # the open sessions again, by header (max_destinations)
        self.timer = TableTimer(self.loop, self.table, self._act)
        self.opening: set[asyncio.Task[None]] = set()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.destinations = 0  # opened, for the control connection's record
        self.bytes_up = self.bytes_down = 0  # of destinations already closed
        self.last_active = self.loop.time()
        self.closed: Close | None = None
        self.loop.add_reader(self.sock.fileno(), self._on_client)

    # -- the control connection ------------------------------------------------------------------

    async def watch(self, conn: socket.socket) -> tuple[Close, str | None]:
        """Wait for the control connection to end (EOF, reset, bytes it must not send) or for the
        association to stay without a client datagram for the listener's idle timeout."""
        while True:
            remaining = self.last_active + self.owner.idle - self.loop.time()
            if remaining <= 0:
                return Close.IDLE, None
            try:
                async with asyncio.timeout(remaining):
                    data = await self.loop.sock_recv(conn, 512)
            except TimeoutError:
                continue  # datagrams may have moved meanwhile: look again
            if not data:
                return Close.EOF, None
            return Close.CLIENT_ERROR, "bytes on the UDP ASSOCIATE control connection"

    def summary(self, detail: str | None) -> str | None:
        """The control connection's detail: its destinations and the datagrams dropped, if any."""
        parts = [detail] if detail else []
        parts.append(f"udp destinations={self.destinations}")
        if self.dropped:
            parts.append("dropped " + " ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())))
        return "; ".join(parts)

    # -- client -> destinations ------------------------------------------------------------------

    def _drop(self, why: str) -> None:
        self.dropped[why] += 1
        self.owner.dropped[why] += 1

    def _on_client(self) -> None:
        sock, by_header, limit, active = self.sock, self.by_header, self.spec.max_datagram, False
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                n, peer = sock.recvfrom_into(_buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # an ICMP error queued on the socket
                log.debug("%s: relay recv: %s", self.owner.name, e)
                continue
            # (the relay socket has the client's family, bound to an unmapped address: no mapped peers)
            if peer[0] != self.client_host or (self.client_port and peer[1] != self.client_port):
                self._drop("foreign")
                continue
            if not self.client_port:  # the first datagram names the client's port from now on
                self.client_port = peer[1]
                self.client = Endpoint(self.client_host, peer[1])
            # an open destination is found by the raw header bytes (RSV and FRAG zero included), without
            # parsing: with a parse per datagram (address to text, an Endpoint) the relay delivered a
            # third as many 1200-byte datagrams (12.7k vs 37.8k pps, scripts/bench_socks_udp.py smoke run)
            atyp = _buffer[3] if n > 4 else 0
            size = _HEADER_SIZE.get(atyp, 0) or (7 + _buffer[4] if atyp == ATYP_DOMAIN else 0)
            known = by_header.get(_view[:size].tobytes()) if 0 < size <= n else None
            if known is not None and n - size <= limit and known.sock is not None:
                active = True
                try:  # _send_up, inlined: this is the per-datagram path of a long flow
                    known.sock.send(_view[size:n])
                except (BlockingIOError, InterruptedError):
                    self._drop("upstream_full")
                    continue
                except OSError:
                    continue
                known.flow.bytes_up += n - size
                continue
            if known is not None and n - size <= limit:  # routed via a peer
                active = True
                self._send_up(known, _view[size:n])
                continue
            try:
                d = parse_datagram(bytes(_view[:n]))
            except SocksUdpError as e:
                log.debug("%s: datagram from %s: %s", self.owner.name, self.client, e)
                self._drop("malformed")
                continue
            if d.frag:
                self._drop("fragment")
                continue
            if len(d.data) > self.spec.max_datagram:
                self._drop("too_big")
                continue
            active = True
            dst = Endpoint(d.host, d.port)
            session = self.sessions.get((self.client, dst))
            if session is not None:
                self._send_up(session, d.data)
            else:
                capped = self.table.dropped["max_sessions_per_client"]
                self._act(self.table.datagram(self.client, dst, d.data, self.loop.time()))
                if self.table.dropped["max_sessions_per_client"] != capped:
                    self._drop("max_destinations")
                self.timer.schedule()
        if active:
            self.last_active = self.loop.time()

    def _send_up(self, session: _Destination, data: bytes | memoryview) -> None:
        if session.sock is None:
            assert session.via is not None and session.target is not None
            if session.via.send(session.target, data):
                session.flow.bytes_up += len(data)
            else:
                self._drop("upstream_full")  # the stream's queue is full (or it is ending)
            return
        try:
            session.sock.send(data)
        except (BlockingIOError, InterruptedError):
            self._drop("upstream_full")  # as a router would
            return
        except OSError as e:  # ICMP port unreachable from an earlier datagram, and the like
            log.debug("%s: send to %s: %s", self.owner.name, session.flow.dst, e)
            return
        session.flow.bytes_up += len(data)

    def _act(self, action: Relay[_Destination] | Open | Expired[_Destination] | Refuse | None) -> None:
        if isinstance(action, Relay):
            self._send_up(action.session, action.payload)
        elif isinstance(action, Open):
            task = self.loop.create_task(self._open(action))
            self.opening.add(task)
            task.add_done_callback(self.opening.discard)
        elif isinstance(action, Expired):
            self._end(action.session, Close.IDLE, None)
        elif isinstance(action, Refuse):
            log.warning("%s: association of %s at max_destinations (%d): %d datagram(s) to new destinations "
                        "dropped", self.owner.name, self.client, self.spec.max_destinations, action.refused)

    # -- one destination -------------------------------------------------------------------------

    async def _open(self, o: Open) -> None:
        """Route one destination and open its upstream socket: the one place a destination is opened
        (route, policy, names resolved and vetted like TCP's), then relay what waited for it."""
        flow = self.ctx.begin(Flow(listener=self.owner.name, client=o.client, dst=o.dst, path="udp"))
        if literal_family(o.dst.host) is None:
            flow.host = o.dst.host.lower()
        apply_sniffed(flow, o.sniffed)
        self.ctx.sniff_outcomes.record(flow, o.timed_out)
        opener = self.owner.opener
        sock: socket.socket | None = None
        try:
            decision = opener.decide(flow)
            if self.owner.sessions >= self.spec.max_sessions:
                raise RefusedByPolicy(f"max_sessions ({self.spec.max_sessions}) reached")
            if decision.action in ("direct", "resolve", "upstream"):
                target = decision.upstream if decision.action == "upstream" else flow.dst
                assert target is not None
                if literal_family(target.host) is None:  # a name: resolved here, each address vetted
                    address = (await opener.addresses(decision, flow, target))[0][1]
                    if decision.action != "upstream":
                        flow.dst = address
            upstream = opener.open_udp(decision, flow)  # rejects and loops are refused here
            if not isinstance(upstream, Upstream):  # via a peer: the far gate resolves and dials
                self._open_via(o, flow, upstream)
                return
            sock = upstream.sock
            to = flow.upstream or flow.dst
            assert to is not None
            try:
                sock.connect((to.host, to.port))
            except OSError as e:
                raise UpstreamUnreachable(f"{to}: {e.strerror}") from None
        except GateError as e:
            if sock is not None:
                sock.close()
            if self.closed is None:
                self.table.refused(o.key)
            self.ctx.finish(flow, e.close, str(e))
            return
        except asyncio.CancelledError:
            self.ctx.finish(flow, self.closed or Close.SHUTDOWN, "association ended while opening")
            raise
        if self.closed is not None:  # the association ended while a name resolved
            sock.close()
            self.ctx.finish(flow, self.closed, "association ended while opening")
            return
        flow.state = FlowState.RELAYING
        # answers come from the remote's address, a name the client sent resolved (as Dante answers);
        # through a route's fixed upstream, from the destination the client named (it never heard of it)
        remote = flow.dst if flow.upstream is None else o.dst
        assert remote is not None
        session = _Destination(o.key, flow, sock, header(o.dst.host, o.dst.port), header(remote.host, remote.port))
        self.by_header[session.asked] = session
        self.owner.sessions += 1
        self.destinations += 1
        late = self.table.opened(o.key, session, self.loop.time())
        self.timer.schedule()
        self.loop.add_reader(sock.fileno(), self._on_upstream, session)
        for _, payload in (*o.datagrams, *late):
            self._send_up(session, payload)

    def _open_via(self, o: Open, flow: Flow, via: ViaUdp) -> None:
        """A destination routed via a mesh peer: one CONNECT-UDP stream, answers wrapped as they come."""
        if self.closed is not None:  # the association ended while the route was decided
            via.close()
            self.ctx.finish(flow, self.closed, "association ended while opening")
            return
        flow.state = FlowState.RELAYING
        wrap = header(o.dst.host, o.dst.port)
        session = _Destination(o.key, flow, None, wrap, wrap, via, o.dst)
        via.max_destinations = 1
        via.on_datagram = functools.partial(self._from_tunnel, session)
        via.on_end = functools.partial(self._via_ended, session)
        self.by_header[session.asked] = session
        self.owner.sessions += 1
        self.destinations += 1
        late = self.table.opened(o.key, session, self.loop.time())
        self.timer.schedule()
        for _, payload in (*o.datagrams, *late):
            self._send_up(session, payload)

    def _from_tunnel(self, session: _Destination, remote: Endpoint, payload: bytes) -> None:
        """An answer through the mesh, wrapped and sent to the client from the relay socket."""
        if len(payload) > self.spec.max_datagram or len(payload) + len(session.header) > MAX_UDP:
            self._drop("too_big")
            return
        try:
            self.sock.sendto(session.header + payload, (self.client.host, self.client.port))
        except OSError as e:
            log.debug("%s: answer to %s: %s", self.owner.name, self.client, e)
            return
        session.flow.bytes_down += len(payload)

    def _via_ended(self, session: _Destination, error: GateError) -> None:
        """The stream failed (refused by the far gate, tunnel lost): the destination ends, and the
        client's next datagram to it is routed afresh."""
        if self.table.end(session.key) is session:
            self._end(session, error.close, str(error))
            self.timer.schedule()

    def _on_upstream(self, session: _Destination) -> None:
        """Answers from one destination, wrapped and sent to the client from the relay socket."""
        up, relay, wrap, limit, total = session.sock, self.sock, session.header, self.spec.max_datagram, 0
        to = (self.client.host, self.client.port)
        assert up is not None  # (only direct destinations have a reader)
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                n = up.recv_into(_buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # ICMP port unreachable and the like
                log.debug("%s: upstream recv: %s", self.owner.name, e)
                continue
            if n > limit or n + len(wrap) > MAX_UDP:
                self._drop("too_big")
                continue
            try:
                relay.sendto(wrap + _view[:n], to)
            except OSError as e:
                log.debug("%s: answer to %s: %s", self.owner.name, self.client, e)
                continue
            total += n
        session.flow.bytes_down += total

    def _end(self, session: _Destination, close: Close, detail: str | None) -> None:
        """Close a destination that left the table, with its one access-log record."""
        if session.sock is not None:
            self.loop.remove_reader(session.sock.fileno())
            session.sock.close()
        if session.via is not None:
            session.via.close()
        self.by_header.pop(session.asked, None)
        self.owner.sessions -= 1
        self.bytes_up += session.flow.bytes_up
        self.bytes_down += session.flow.bytes_down
        self.ctx.finish(session.flow, close, detail)

    def close(self, reason: Close) -> None:
        """The control connection ended: the relay socket, every destination and every open in
        progress end with it (held datagrams are dropped)."""
        if self.closed is not None:
            return
        self.closed = reason
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.timer.cancel()
        for task in list(self.opening):
            task.cancel()
        for session in self.table.shutdown():
            self._end(session, reason, "association ended")
