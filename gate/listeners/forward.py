"""Fixed port-forward: every client goes to the configured ``to`` (routes may still redirect or reject)."""

from __future__ import annotations

import socket

from gate.config import ForwardSpec
from gate.errors import GateError
from gate.flow import Flow
from gate.listeners.base import Listener, reset

__all__ = ["ForwardListener"]


class ForwardListener(Listener):
    spec: ForwardSpec

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        flow.dst = self.spec.to
        self.route_without_handshake(conn, flow)

    async def handle(self, conn: socket.socket, flow: Flow) -> None:
        """The general path (rejects, names to resolve): connect, then relay; failures reset the client."""
        try:
            upstream = await self.connect(flow)
        except GateError:
            reset(conn)  # no protocol to answer in: a refused upstream looks refused to the client too
            raise
        await self.relay(flow, conn, upstream)
