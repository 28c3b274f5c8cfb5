"""The ``h2`` listener: tunnels from peer gates (TLS 1.3 with client certificates, HTTP/2 CONNECT).

A TLS handshake with an unknown certificate fails here; what the streams of an accepted connection
carry is served by gate.mesh.inbound. A peer that negotiated ALPN ``ugate-reverse`` offers a reverse
tunnel instead: it is behind NAT, so we take the HTTP/2 client role on its connection and the mesh
dials it ``via`` that connection (gate.mesh.dialer.Mesh.adopt).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Coroutine
from typing import Any

from gate.addr import Endpoint
from gate.config import H2Spec
from gate.listeners.base import Context, bind_listening_socket
from gate.mesh.inbound import Inbound
from gate.mesh.session import Session

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
        self.inbound = Inbound(spec.name, ctx, spec.timeouts.connect, spec.timeouts.idle)
        self.sock: socket.socket | None = None
        self.sessions: set[Session] = set()
        self.handshakes: set[asyncio.Task[None]] = set()

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
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    async def _handshake(self, conn: socket.socket, peer_addr: Endpoint) -> None:
        session = Session(self.mesh.trust.mesh, client_side=None, on_request=self.inbound.on_request,
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
        if session.client_side:  # a reverse tunnel: the peer serves, we open streams
            if peer is None:
                log.warning("%s: reverse tunnel from unknown gate %s at %s refused", self.spec.name, ident, peer_addr)
                session.close()
                return
            self.sessions.add(session)
            self.mesh.adopt(peer.name, session)
            log.info("%s: reverse tunnel from gate %s (%s) at %s", self.spec.name, peer.name, ident, peer_addr)
            return
        self.sessions.add(session)
        log.info("%s: tunnel from gate %s (%s) at %s", self.spec.name, peer.name if peer else "unknown", ident,
                 peer_addr)

    def stop_accepting(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def drain(self, timeout: float) -> None:
        """Let open streams finish for up to ``timeout``, then close every tunnel."""
        await self.inbound.drain(timeout)
        for task in list(self.handshakes):
            task.cancel()
        for session in list(self.sessions):
            session.close()
