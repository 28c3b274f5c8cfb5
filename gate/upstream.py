"""The one upstream opener: route a flow, apply the checks that hold for every flow, open its upstream.

Every path that sends a flow somewhere comes through here: each TCP listener kind, the HTTP proxy's
forwarded requests, streams served for mesh peers, and UDP sessions. So the policy lives here and
nowhere else:
- the route decision (recorded in the flow);
- numeric host forms normalised as the resolver reads them (``127.1``, ``2130706433``, ``0x7f000001``
  are 127.0.0.1), before routing, so rules on addresses see the address;
- the loop guard: a destination that is one of this gate's own listening addresses is refused,
  whether the flow names it as an address (an unspecified one, 0.0.0.0 or ::, is this host) or as a
  name that resolves to one (names are resolved here, before dialling, and only addresses that pass
  are dialled);
- destination rules hold for what is dialled: each address a client-chosen name resolves to is routed
  again as the destination, and addresses a route rejects are not dialled (so ``dst: [127.0.0.0/8]`` with
  ``action: reject`` also stops ``localhost``);
- UDP sessions' upstream sockets (``open_udp``), under the same route decision and loop guard;
- what the route asks of the upstream connection (SO_MARK, the client's source address, a PROXY
  protocol header, which comes back in the result instead of being spliced into the flow's bytes).
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gate.addr import Endpoint
from gate.deadlines import Sweeper, sweep_interval
from gate.dial import Connect, SocketOptions, literal_family, open_tcp, resolve
from gate.errors import GateError, RefusedByPolicy, RejectedByRule, UpstreamError, UpstreamUnreachable
from gate.flow import MAX_HOPS, Flow, FlowState
from gate.mesh.udp_via import MAX_DESTINATIONS, ViaUdp
from gate.router import Decision, FlowKey
from sniff import proxy_protocol
from tproxy.sockopts import is_local_address, set_big_buffers, set_mark, set_transparent, unmap

if TYPE_CHECKING:
    from gate.context import Context

__all__ = ["LOOP", "Opener", "OwnAddresses", "Upstream"]

LOOP = "the destination is ugate itself (a loop)"


@dataclass(frozen=True, slots=True)
class Upstream:
    """An opened upstream: its socket, the bytes to send before the client's (a PROXY protocol
    header, when the route asks for one), and the mesh peer carrying it (route action via)."""

    sock: socket.socket
    header: bytes = b""
    peer: str | None = None


_NUMERIC = re.compile(r"^[0-9][0-9a-fA-FxX.]*$")  # what inet_aton might read as an IPv4 address


@functools.lru_cache(maxsize=4096)
def numeric_address(host: str) -> str | None:
    """The IPv4 address a numeric host form that is not a dotted quad stands for, as getaddrinfo and
    inet_aton read it (``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``); None for addresses
    already in canonical form and for names."""
    if not _NUMERIC.match(host) or literal_family(host) is not None:
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


class OwnAddresses:
    """This gate's listening addresses: a flow to one of them would come straight back to us."""

    def __init__(self, listening: frozenset[Endpoint]) -> None:
        self.listening = listening
        self.ports = frozenset(e.port for e in listening)
        self.wildcard_ports = frozenset(e.port for e in listening if e.host in ("0.0.0.0", "::"))

    def __contains__(self, dst: Endpoint) -> bool:
        """Asked per flow for an address literal: the common answer (a port none of ours listens on)
        is one set lookup."""
        if dst.port not in self.ports:
            return False
        host = unmap(dst.host)
        if Endpoint(host, dst.port) in self.listening:
            return True
        if host in ("0.0.0.0", "::"):  # connect() to the unspecified address reaches this host
            return True
        return dst.port in self.wildcard_ports and literal_family(host) is not None and is_local_address(host)


def proxy_header(version: str | None, client: Endpoint, upstream: socket.socket, hops: int = 0) -> bytes:
    """The PROXY protocol header a route asks for: the client, and the address actually dialled (v2 also
    counts the gates the flow crossed, ``hops``, so a loop through PROXY-speaking gates ends)."""
    if version is None:
        return b""
    source = (client.host, client.port)
    try:
        peer = upstream.getpeername()
    except OSError:
        peer = None
    if peer is None or (":" in source[0]) != (":" in peer[0]):  # families differ: say "unknown"
        return b"PROXY UNKNOWN\r\n" if version == "v1" else proxy_protocol.V2_SIGNATURE + b"\x20\x00\x00\x00"
    destination = (peer[0], peer[1])
    if version == "v1":
        return proxy_protocol.build_v1(source, destination)
    return proxy_protocol.build_v2(source, destination, hops)


def _too_far(flow: Flow) -> str:
    return f"crossed {flow.hops} gates (a loop through other hosts?)"


def _check_hops(flow: Flow) -> None:
    """A flow that crossed MAX_HOPS gates goes no further (it is most likely looping)."""
    if flow.hops >= MAX_HOPS:
        raise RefusedByPolicy(_too_far(flow))


def _preserving(sock: socket.socket, client: Endpoint, dst: Endpoint | None) -> None:
    """Bind a UDP upstream socket to the client's own address and port (IP_TRANSPARENT; SO_REUSEADDR:
    a symmetric session per destination binds it again), connected to ``dst`` if given."""
    if (":" in client.host) != (sock.family == socket.AF_INET6):
        raise OSError(0, "the client's address family differs from the destination's")
    set_transparent(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((client.host, client.port))
    if dst is not None:
        sock.connect((dst.host, dst.port))


def _ignore(flow: Flow) -> None:
    pass


class Opener:
    """Routes and opens upstreams for the flows of one listener (or one mesh inbound)."""

    def __init__(self, ctx: Context, listener: str, connect_timeout: float, *, preserve_source: bool = False,
                 sweeper: Sweeper | None = None) -> None:
        self.ctx = ctx
        self.listener = listener
        self.connect_timeout = connect_timeout
        self.preserve_source = preserve_source
        self.own = OwnAddresses(ctx.own)
        loop = asyncio.get_running_loop()
        self._sweeper = sweeper if sweeper is not None else Sweeper(loop, sweep_interval(connect_timeout))
        # told when a flow counted among its source's pending handshakes is routed (the accept loop)
        self.on_routed: Callable[[Flow], None] = _ignore

    # -- routing ---------------------------------------------------------------------------------

    def key(self, flow: Flow) -> FlowKey:
        """What routing may look at of ``flow``."""
        dst = flow.dst
        assert dst is not None
        return FlowKey(self.listener, flow.client.host, dst.host, dst.port, flow.host, flow.protocol, flow.sni,
                       flow.alpn)

    def decide(self, flow: Flow) -> Decision:
        """Route the flow and record the decision in it."""
        dst = flow.dst
        assert dst is not None
        address = numeric_address(dst.host)
        if address is not None:  # the client spelled an address as a "name": route the address
            flow.dst = Endpoint(address, dst.port)
            if flow.host == dst.host.lower():
                flow.host = None
        decision = self.ctx.router.decide(self.key(flow))
        flow.rule, flow.action, flow.upstream = decision.rule, decision.action, decision.upstream
        flow.intercept = decision.route.intercept if decision.route is not None else None
        flow.state = FlowState.ROUTED
        if flow.pending:
            self.on_routed(flow)
        return decision

    def needs_sniff(self, flow: Flow) -> bool:
        """Could what sniffing finds change this flow's route? (see Router.needs_sniff)"""
        return self.ctx.router.needs_sniff(self.key(flow))

    def literal(self, decision: Decision, flow: Flow) -> tuple[Endpoint, int] | None:
        """The address and family to dial when the decision names an address literal (the callback
        path, ``open_soon``, serves those); None for rejects, peers and names."""
        if decision.action not in ("direct", "upstream", "resolve"):
            return None
        target = decision.upstream or flow.dst
        assert target is not None
        family = literal_family(target.host)
        return None if family is None else (target, family)

    # -- opening ---------------------------------------------------------------------------------

    def _options(self, flow: Flow, decision: Decision) -> SocketOptions | None:
        """The upstream socket's mark, and the client's address to leave from when preserving it."""
        preserve = decision.preserve_source or self.preserve_source
        if not preserve and self.ctx.mark is None:
            return None
        if not preserve:
            return SocketOptions(self.ctx.mark)
        # An app in this namespace (ingress sidecar): the client's own port would give the app's socket
        # the 4-tuple of the one we accepted, which the kernel refuses as a duplicate. Only the address
        # is the client's then (as Envoy's original_src does), with a port no socket here pairs with
        # the app's address (tproxy.tuples).
        target = decision.upstream or flow.dst
        if target is not None and literal_family(target.host) is not None and is_local_address(target.host):
            return SocketOptions(self.ctx.mark, (flow.client.host, 0), apart_from=(target.host, target.port))
        return SocketOptions(self.ctx.mark, (flow.client.host, flow.client.port))

    def _header(self, decision: Decision, flow: Flow, sock: socket.socket) -> bytes:
        version = decision.route.proxy_protocol if decision.route is not None else None
        return proxy_header(version, flow.client, sock, flow.hops + 1) if version is not None else b""

    async def open(self, decision: Decision, flow: Flow) -> Upstream:
        """Open the upstream ``decision`` names for ``flow``; RejectedByRule, RefusedByPolicy or an
        UpstreamError when there is none."""
        flow.state = FlowState.CONNECTING
        if decision.action == "reject":
            raise RejectedByRule(f"rejected by {decision.rule}")
        _check_hops(flow)
        if decision.action == "via":
            if self.ctx.mesh is None or decision.via is None:
                raise UpstreamUnreachable("via: this gate has no mesh section")
            flow.peer = decision.via
            sock = await self.ctx.mesh.open_stream(decision.via, flow, self.connect_timeout)
            return Upstream(sock, b"", decision.via)
        target = decision.upstream or flow.dst
        assert target is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        allowed = await self.addresses(decision, flow, target)
        sock = await open_tcp(target, max(deadline - loop.time(), 0.001), self._options(flow, decision), allowed)
        return Upstream(sock, self._header(decision, flow, sock))

    async def addresses(self, decision: Decision, flow: Flow, target: Endpoint) -> list[tuple[int, Endpoint]]:
        """``target``'s addresses that may be dialled, TCP or UDP alike: resolved (within the connect
        timeout) and vetted (``_vet``); RejectedByRule, RefusedByPolicy or an UpstreamError otherwise."""
        return self._vet(await resolve(target, self.connect_timeout), decision, flow, target)

    def _vet(self, addresses: list[tuple[int, Endpoint]], decision: Decision, flow: Flow,
             target: Endpoint) -> list[tuple[int, Endpoint]]:
        """The addresses that may be dialled: none of ours, and, for a name the client chose (not a
        configured upstream), none that the routes reject when asked with it as the destination."""
        client_chose = decision.action in ("direct", "resolve") and literal_family(target.host) is None
        allowed, looped, rejected = [], False, None
        for family, addr in addresses:
            if addr in self.own:
                looped = True
                continue
            if client_chose:
                again = self.ctx.router.decide(replace(self.key(flow), dst_host=addr.host))
                if again.action == "reject":
                    rejected = f"rejected by {again.rule} ({target.host} is {addr.host})"
                    continue
            allowed.append((family, addr))
        if not allowed:
            if rejected is not None and not looped:
                raise RejectedByRule(rejected)
            raise RefusedByPolicy(LOOP if literal_family(target.host) else f"{target.host}: {LOOP}")
        return allowed

    def open_soon(self, decision: Decision, flow: Flow, target: Endpoint, family: int,
                  done: Callable[[Upstream | None, GateError | None], None]) -> Connect | None:
        """``open`` without a task, for a decision naming an address literal (see ``literal``): the
        connect is driven by callbacks, and ``done`` gets the upstream or the error. Per-flow cost is
        what limits the connection rate, and a task with its coroutine frames is the largest part of
        it. Returns the attempt (to cancel at shutdown), or None when the flow was refused at once
        (``done`` has been called)."""
        flow.state = FlowState.CONNECTING
        if target in self.own or flow.hops >= MAX_HOPS:
            done(None, RefusedByPolicy(LOOP if target in self.own else _too_far(flow)))
            return None
        return Connect(asyncio.get_running_loop(), target, family, self.connect_timeout,
                       functools.partial(self._connected, decision, flow, done), self._sweeper,
                       self._options(flow, decision))

    def open_udp(self, decision: Decision, flow: Flow, connect: bool = False,
                 max_destinations: int = MAX_DESTINATIONS) -> Upstream | ViaUdp:
        """A UDP session's upstream, for any UDP listener: the one place that decides direct or via.

        Direct (and upstream, resolve): a socket, marked, unconnected (a full-cone session sends to many
        destinations). The route's fixed upstream, if any, is recorded in ``flow.upstream``; without one
        each datagram goes to its own destination. ``resolve`` keeps the original destination: a session
        opens on its first datagram, without waiting on DNS. With ``preserve_source`` it leaves from the
        client's address and port (``connect``: a session of one destination, so sessions of one client
        port to several servers each get their answers).
        Via a peer: a ``ViaUdp``, usable at once, that opens one CONNECT-UDP stream per destination (at
        most ``max_destinations``); the caller sets its ``on_datagram`` and ``on_end``."""
        flow.state = FlowState.CONNECTING
        if decision.action == "reject":
            raise RejectedByRule(f"rejected by {decision.rule}")
        _check_hops(flow)
        if decision.action == "via":
            if self.ctx.mesh is None or decision.via is None:
                raise UpstreamUnreachable("via: this gate has no mesh section")
            flow.peer = decision.via
            return ViaUdp(self.ctx.mesh, decision.via, flow, self.connect_timeout, max_destinations)
        target = decision.upstream if decision.action == "upstream" else None
        flow.upstream = target
        dst = target or flow.dst
        assert dst is not None
        if dst in self.own:
            raise RefusedByPolicy(LOOP)
        family = socket.AF_INET6 if ":" in dst.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            if self.ctx.mark is not None:
                set_mark(sock, self.ctx.mark)
            set_big_buffers(sock)
            if decision.preserve_source or self.preserve_source:
                _preserving(sock, flow.client, dst if connect else None)
            else:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        except OSError as e:
            sock.close()
            raise UpstreamUnreachable(f"no UDP socket: {e.strerror}") from None
        return Upstream(sock)

    def _connected(self, decision: Decision, flow: Flow, done: Callable[[Upstream | None, GateError | None], None],
                   sock: socket.socket | None, error: UpstreamError | None) -> None:
        done(None, error) if sock is None else done(Upstream(sock, self._header(decision, flow, sock)), None)

    def close(self) -> None:
        self._sweeper.close()
