"""The ``h2`` listener: tunnels from peer gates (TLS 1.3 with client certificates, HTTP/2 CONNECT).

Each stream is one flow: the peer must be a configured gate (see gate.mesh.trust) whose ``allow``
list admits the destination, then the flow is routed by this gate's own routes (direct, upstream, or
on ``via`` another peer) and bridged to the upstream socket. Refusals answer in HTTP: 403 (unknown
gate, not allowed, rejected by a route), 502 with ``ugate-error: refused|unreachable``, 504 on a
connect timeout; the dialling gate maps them back to its client's protocol.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Coroutine
from typing import Any

from gate.addr import Endpoint, is_ip, parse_endpoint
from gate.config import H2Spec
from gate.dial import SocketOptions, open_tcp
from gate.errors import GateError, RejectedByRule, UpstreamRefused, UpstreamTimeout
from gate.flow import Flow
from gate.listeners.base import Context, bind_listening_socket
from gate.mesh.dialer import ERROR_HEADER
from gate.mesh.session import Bridge, Session
from gate.router import FlowKey, why_not

__all__ = ["H2Listener"]

log = logging.getLogger("ugate")


class H2Listener:
    """Same lifecycle as the other listeners (start, stop_accepting, drain)."""

    def __init__(self, spec: H2Spec, ctx: Context) -> None:
        if ctx.mesh is None:
            raise RuntimeError("an h2 listener needs the mesh (config: mesh:)")
        self.spec = spec
        self.ctx = ctx
        self.mesh = ctx.mesh
        self.loop = asyncio.get_running_loop()
        self.ssl = self.mesh.trust.server_context()
        self.sock: socket.socket | None = None
        self.sessions: set[Session] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.flows: dict[tuple[Session, int], Flow] = {}

    def start(self) -> None:
        self.sock = bind_listening_socket(self.spec.listen, reuse_port=self.ctx.reuse_port)
        self.loop.add_reader(self.sock.fileno(), self._on_accept)
        log.info("listener %s (h2, gate %s) on %s", self.spec.name, self.mesh.trust.identity.id, self.spec.listen)

    def _on_accept(self) -> None:
        assert self.sock is not None
        for _ in range(64):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("%s: accept: %s", self.spec.name, e.strerror)
                return
            conn.setblocking(False)
            self._spawn(self._handshake(conn, Endpoint(addr[0], addr[1])))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handshake(self, conn: socket.socket, peer_addr: Endpoint) -> None:
        session = Session(self.mesh.trust.mesh, client_side=False, on_request=self._on_request,
                          on_lost=self.sessions.discard)
        try:
            # (with ssl, uvloop returns its SSL wrapper as the protocol: ours is the one made here)
            await self.loop.connect_accepted_socket(lambda: session, conn, ssl=self.ssl,
                                                    ssl_handshake_timeout=self.spec.timeouts.handshake)
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as e:
            log.warning("%s: gate at %s refused: %s", self.spec.name, peer_addr, e)
            conn.close()
            return
        ident, peer = self.mesh.trust.inbound_peer(session.peer_der)
        self.sessions.add(session)
        log.info("%s: tunnel from gate %s (%s) at %s", self.spec.name, peer.name if peer else "unknown", ident,
                 peer_addr)

    def _on_request(self, session: Session, stream_id: int, headers: dict[str, str]) -> None:
        self._spawn(self._serve(session, stream_id, headers))

    async def _serve(self, session: Session, stream_id: int, headers: dict[str, str]) -> None:
        ident, peer = self.mesh.trust.inbound_peer(session.peer_der)
        try:
            client = parse_endpoint(headers.get("ugate-client", ""))
        except ValueError:
            client = Endpoint("0.0.0.0", 0)
        flow = Flow(listener=self.spec.name, client=client)
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
        key = FlowKey(self.spec.name, client.host, flow.dst.host, flow.dst.port, flow.host, flow.protocol, flow.sni)
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
            await session.attach(stream_id, upstream, lambda bridge: self._bridge_closed(session, bridge))
        except ConnectionError as e:
            self.flows.pop((session, stream_id), None)
            flow.close_reason = f"tunnel: {e}"
            self._log(flow)

    async def _connect(self, flow: Flow, key: FlowKey) -> socket.socket:
        decision = self.ctx.router.decide(key)
        flow.rule, flow.action, flow.upstream = decision.rule, decision.action, decision.upstream
        if decision.action == "reject":
            raise RejectedByRule(f"rejected by {decision.rule}")
        if decision.action == "via":
            assert decision.via is not None
            return await self.mesh.open(decision.via, flow, self.spec.timeouts.connect)
        target = decision.upstream or flow.dst
        assert target is not None
        opts = SocketOptions(self.ctx.mark, None) if self.ctx.mark is not None else None
        return await open_tcp(target, self.spec.timeouts.connect, opts)

    def _refuse(self, session: Session, stream_id: int, flow: Flow, status: int, reason: str,
                kind: str = "") -> None:
        session.respond(stream_id, status, [(ERROR_HEADER, kind)] if kind else [], end=True)
        session.discard(stream_id)
        flow.close_reason = f"{status} {reason}"
        self._log(flow)

    def _bridge_closed(self, session: Session, bridge: Bridge) -> None:
        flow = self.flows.pop((session, bridge.stream_id), None)
        if flow is None:
            return
        flow.bytes_up, flow.bytes_down = bridge.bytes_to_socket, bridge.bytes_to_stream
        flow.path = "h2"
        flow.close_reason = bridge.error or "closed"
        self._log(flow)

    def _log(self, flow: Flow) -> None:
        if not flow.logged:
            flow.logged = True
            if self.ctx.access_log.enabled:
                self.ctx.access_log.write(flow.record())

    def stop_accepting(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def drain(self, timeout: float) -> None:
        """Let open streams finish for up to ``timeout``, then close every tunnel."""
        deadline = self.loop.time() + timeout
        while self.flows and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.tasks):
            task.cancel()
        for session in list(self.sessions):
            session.close()
        for flow in list(self.flows.values()):
            flow.close_reason = "shutdown"
            self._log(flow)
        self.flows.clear()


def _answer_for(error: GateError) -> tuple[int, str]:
    """HTTP status and ugate-error reason for a failed inner connect."""
    if isinstance(error, RejectedByRule):
        return 403, "rejected"
    if isinstance(error, UpstreamTimeout):
        return 504, "timeout"
    if isinstance(error, UpstreamRefused):
        return 502, "refused"
    return 502, "unreachable"
