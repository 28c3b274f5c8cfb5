"""The ``h2`` listener: tunnels from peer gates (TLS 1.3 with client certificates, HTTP/2 CONNECT).

Connections come through the shared accept loop (back-off on descriptor exhaustion, max_flows, PROXY
headers). A TLS handshake with an unknown certificate fails here; what the streams of an accepted
connection carry is served by gate.mesh.inbound. A peer that negotiated ALPN ``ugate-reverse`` offers a
reverse tunnel instead: it is behind NAT, so we take the HTTP/2 client role on its connection and the
mesh dials it ``via`` that connection (gate.mesh.dialer.Mesh.adopt).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from gate.accept import AcceptLoop
from gate.config import H2Spec
from gate.context import Context
from gate.flow import Flow
from gate.mesh.dialer import Mesh
from gate.mesh.h2_streams import request_handler
from gate.mesh.inbound import Inbound
from gate.mesh.session import Session
from gate.runner import reset

__all__ = ["H2Listener"]

log = logging.getLogger("ugate")

class H2Listener:
    """Same lifecycle as the other listeners (start, stop_accepting, drain); max_flows bounds the
    tunnels (TLS connections), not the streams inside them."""

    def __init__(self, spec: H2Spec, ctx: Context) -> None:
        if not isinstance(ctx.mesh, Mesh):
            raise RuntimeError("an h2 listener needs the mesh (config: mesh:)")
        self.spec = spec
        self.ctx = ctx
        self.mesh = ctx.mesh
        self.loop = asyncio.get_running_loop()
        self.ssl = self.mesh.trust.server_context()
        self.inbound = Inbound(spec.name, ctx, spec.timeouts.connect, spec.timeouts.idle)
        self.on_request = request_handler(self.mesh.trust, self.inbound.serve,
                                          self.mesh.exchanges_for(self.inbound.serve))
        self.sessions: set[Session] = set()
        self.handshakes: set[asyncio.Task[None]] = set()
        self.acceptor = AcceptLoop(spec, on_flow=self._accepted, on_refused=self._refused, active=self._active,
                                   reuse_port=ctx.reuse_port)

    def _active(self) -> int:
        return len(self.sessions) + len(self.handshakes) + len(self.acceptor.headers)

    def start(self) -> None:
        self.acceptor.start()
        log.info("listener %s (h2, gate %s) on %s", self.spec.name, self.mesh.trust.identity.id, self.spec.listen)

    def _accepted(self, conn: socket.socket, flow: Flow) -> None:
        task = self.loop.create_task(self._handshake(conn, flow))
        self.handshakes.add(task)
        task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self.handshakes.discard(task)
        self.acceptor.resume()

    def _refused(self, conn: socket.socket, flow: Flow) -> None:
        reset(conn)
        conn.close()
        self.ctx.finish(flow)

    def _lost(self, session: Session) -> None:
        self.sessions.discard(session)
        self.acceptor.resume()

    async def _handshake(self, conn: socket.socket, flow: Flow) -> None:
        session = Session(self.mesh.trust.mesh, client_side=None, on_request=self.on_request, on_lost=self._lost)
        try:
            # (with ssl, uvloop returns its SSL wrapper as the protocol: ours is the one made here)
            await self.loop.connect_accepted_socket(lambda: session, conn, ssl=self.ssl,
                                                    ssl_handshake_timeout=self.spec.timeouts.handshake)
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as e:
            log.warning("%s: gate at %s refused: %s", self.spec.name, flow.client, e)
            conn.close()
            return
        ident, peer = session.peer = self.mesh.trust.inbound_peer(session.peer_der)
        if session.client_side:  # a reverse tunnel: the peer serves, we open streams
            if peer is None:
                log.warning("%s: reverse tunnel from unknown gate %s at %s refused", self.spec.name, ident,
                            flow.client)
                session.close()
                return
            self.sessions.add(session)
            self.mesh.adopt(peer.name, session)
            log.info("%s: reverse tunnel from gate %s (%s) at %s", self.spec.name, peer.name, ident, flow.client)
            return
        self.sessions.add(session)
        log.info("%s: tunnel from gate %s (%s) at %s", self.spec.name, peer.name if peer else "unknown", ident,
                 flow.client)

    def stop_accepting(self) -> None:
        self.acceptor.stop()

    async def drain(self, timeout: float) -> None:
        """Let open streams finish for up to ``timeout``, then close every tunnel."""
        for conn, flow in self.acceptor.cut():
            self._refused(conn, flow)
        await self.inbound.drain(timeout)
        for task in list(self.handshakes):
            task.cancel()
        for session in list(self.sessions):
            session.close()
