"""What a TCP listener kind is made of: the shared accept loop and flow runner, plus its ``accepted``.

A kind subclasses ``TcpListener`` and writes ``accepted(conn, flow)`` only: hand the flow to the runner
with ``runner.forward`` (destination known), ``runner.sniff`` or ``runner.handshake`` (its protocol).
"""

from __future__ import annotations

import logging
import socket
from typing import ClassVar, Protocol

from gate.accept import AcceptLoop
from gate.config import ListenerSpec
from gate.context import Context
from gate.flow import Close, Flow
from gate.runner import FlowRunner

__all__ = ["Server", "TcpListener"]

log = logging.getLogger("ugate")


class Server(Protocol):
    """What the app needs of a listener of any kind (TCP or UDP)."""

    def start(self) -> None: ...

    def stop_accepting(self) -> None: ...

    async def drain(self, timeout: float) -> None: ...


class TcpListener:
    """Base of the TCP listener kinds (see the module docstring)."""

    transparent: ClassVar[bool] = False  # IP_TRANSPARENT listening socket (TPROXY)

    def __init__(self, spec: ListenerSpec, ctx: Context) -> None:
        self.spec = spec
        self.ctx = ctx
        self.runner = FlowRunner(spec, ctx)
        self.acceptor = AcceptLoop(spec, on_flow=self.accepted, on_refused=self._bad_proxy_header,
                                   active=self._active, reuse_port=ctx.reuse_port, transparent=self.transparent,
                                   per_source=True)
        self.runner.on_end = self.acceptor.ended
        self.runner.opener.on_routed = self.acceptor.routed

    def _active(self) -> int:
        return self.runner.active + len(self.acceptor.headers)

    def start(self) -> None:
        self.acceptor.start()
        log.info("listener %s (%s) on %s", self.spec.name, self.spec.kind, self.spec.listen)

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        """A client connected (its PROXY header, if it owed one, read): hand the flow to the runner."""
        raise NotImplementedError

    def _bad_proxy_header(self, conn: socket.socket, flow: Flow) -> None:
        self.runner.refuse(conn, flow, flow.close or Close.CLIENT_ERROR, flow.detail)

    def stop_accepting(self) -> None:
        self.acceptor.stop()

    async def drain(self, timeout: float) -> None:
        """Connections still owing a PROXY header are cut at once (they are not flows yet); open flows
        get up to ``timeout`` to end by themselves."""
        for conn, flow in self.acceptor.cut():
            self.runner.refuse(conn, flow, Close.SHUTDOWN)
        await self.runner.drain(timeout)
