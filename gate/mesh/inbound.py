"""Flows a peer gate sends us: one per CONNECT stream of a session where we are the HTTP/2 server.

That is every session the ``h2`` listener accepts, and the reverse tunnels this gate keeps open to a
peer (it dials out, then serves the streams the peer opens). The peer must be a configured gate whose
``allow`` list admits the destination; the flow then takes this gate's routes (direct, upstream, or on
``via`` another peer) and is bridged to the upstream socket. Refusals answer in HTTP: 403 (unknown gate,
not allowed, rejected by a route), 502 with ``ugate-error: refused|unreachable``, 504 on a connect
timeout; the dialling gate maps them back to its client's protocol.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import h2.errors

from gate.addr import Endpoint, is_ip, parse_endpoint
from gate.dial import SocketOptions, open_tcp
from gate.errors import GateError, RejectedByRule, UpstreamRefused, UpstreamTimeout
from gate.flow import Flow
from gate.mesh.dialer import ERROR_HEADER
from gate.mesh.session import Bridge, Session
from gate.router import FlowKey, why_not
from splice import Sweeper, sweep_interval

if TYPE_CHECKING:
    from gate.listeners.base import Context

__all__ = ["Inbound"]


class Inbound:
    """Serves the streams of inbound sessions for one listener (or one reverse tunnel)."""

    def __init__(self, name: str, ctx: Context, connect_timeout: float, idle_timeout: float) -> None:
        assert ctx.mesh is not None
        self.name = name  # the listener name of these flows in routes and the access log
        self.ctx = ctx
        self.mesh = ctx.mesh
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.sweeper = Sweeper(asyncio.get_running_loop(), sweep_interval(idle_timeout))
        self.tasks: set[asyncio.Task[None]] = set()
        self.flows: dict[tuple[Session, int], Flow] = {}
        self.idle: dict[Bridge, _IdleWatch] = {}

    def on_request(self, session: Session, stream_id: int, headers: dict[str, str]) -> None:
        self._spawn(self._serve(session, stream_id, headers))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, session: Session, stream_id: int, headers: dict[str, str]) -> None:
        ident, peer = self.mesh.trust.inbound_peer(session.peer_der)
        try:
            client = parse_endpoint(headers.get("ugate-client", ""))
        except ValueError:
            client = Endpoint("0.0.0.0", 0)
        flow = Flow(listener=self.name, client=client)
        flow.protocol = headers.get("ugate-protocol") or None
        flow.sni = headers.get("ugate-sni") or None
        if headers.get(":method") != "CONNECT":
            self._refuse(session, stream_id, flow, 405, "only CONNECT is served")
            return
        try:
            flow.dst = parse_endpoint(headers.get(":authority", ""))
        except ValueError as e:
            self._refuse(session, stream_id, flow, 400, f"bad authority: {e}")
            return
        flow.host = None if is_ip(flow.dst.host) else flow.dst.host.lower()
        if peer is None:
            self._refuse(session, stream_id, flow, 403, f"gate {ident} is not a configured peer")
            return
        key = FlowKey(self.name, client.host, flow.dst.host, flow.dst.port, flow.host, flow.protocol, flow.sni)
        if not any(why_not(allowed, key) is None for allowed in peer.allow):
            self._refuse(session, stream_id, flow, 403, f"peer {peer.name} may not reach {flow.dst}")
            return
        try:
            upstream = await self._connect(flow, key)
        except GateError as e:
            status, reason = _answer_for(e)
            self._refuse(session, stream_id, flow, status, str(e), reason)
            return
        except asyncio.CancelledError:
            session.discard(stream_id)
            flow.close_reason = "shutdown"
            self._log(flow)
            raise
        session.respond(stream_id, 200)
        self.flows[(session, stream_id)] = flow
        try:
            bridge = await session.attach(stream_id, upstream, lambda bridge: self._bridge_closed(session, bridge))
        except ConnectionError as e:
            self.flows.pop((session, stream_id), None)
            flow.close_reason = f"tunnel: {e}"
            self._log(flow)
            return
        if not bridge.closed:
            watch = self.idle[bridge] = _IdleWatch(bridge, self.idle_timeout)
            self.sweeper.add(watch)

    async def _connect(self, flow: Flow, key: FlowKey) -> socket.socket:
        decision = self.ctx.router.decide(key)
        flow.rule, flow.action, flow.upstream = decision.rule, decision.action, decision.upstream
        if decision.action == "reject":
            raise RejectedByRule(f"rejected by {decision.rule}")
        if decision.action == "via":
            assert decision.via is not None
            return await self.mesh.open(decision.via, flow, self.connect_timeout)
        target = decision.upstream or flow.dst
        assert target is not None
        opts = SocketOptions(self.ctx.mark, None) if self.ctx.mark is not None else None
        return await open_tcp(target, self.connect_timeout, opts)

    def _refuse(self, session: Session, stream_id: int, flow: Flow, status: int, reason: str,
                kind: str = "") -> None:
        session.respond(stream_id, status, [(ERROR_HEADER, kind)] if kind else [], end=True)
        session.discard(stream_id)
        flow.close_reason = f"{status} {reason}"
        self._log(flow)

    def _bridge_closed(self, session: Session, bridge: Bridge) -> None:
        watch = self.idle.pop(bridge, None)
        if watch is not None:
            self.sweeper.discard(watch)
        flow = self.flows.pop((session, bridge.stream_id), None)
        if flow is None:
            return
        flow.bytes_up, flow.bytes_down = bridge.bytes_to_socket, bridge.bytes_to_stream
        flow.path = "h2"
        flow.close_reason = bridge.error or "closed"
        self._log(flow)

    def _log(self, flow: Flow) -> None:
        self.ctx.log_flow(flow)

    async def drain(self, timeout: float) -> None:
        """Let open flows finish for up to ``timeout``, then cancel what is still being set up and log
        the rest as cut by the shutdown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.flows and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.tasks):
            task.cancel()
        for flow in list(self.flows.values()):
            flow.close_reason = "shutdown"
            self._log(flow)
        self.flows.clear()
        self.sweeper.close()


class _IdleWatch:
    """Ends a tunnelled flow that moved no byte either way for ``timeout`` seconds (as the TCP relays'
    idle timeout does): the upstream socket is reset and the stream with it."""

    __slots__ = ("bridge", "timeout")

    def __init__(self, bridge: Bridge, timeout: float) -> None:
        self.bridge = bridge
        self.timeout = timeout

    def deadline(self) -> float:
        return self.bridge.last_active + self.timeout

    def expire(self) -> None:
        self.bridge.session.reset(self.bridge.stream_id, h2.errors.ErrorCodes.CANCEL)
        self.bridge.abort("idle timeout")


def _answer_for(error: GateError) -> tuple[int, str]:
    """HTTP status and ugate-error reason for a failed inner connect."""
    if isinstance(error, RejectedByRule):
        return 403, "rejected"
    if isinstance(error, UpstreamTimeout):
        return 504, "timeout"
    if isinstance(error, UpstreamRefused):
        return 502, "refused"
    return 502, "unreachable"
