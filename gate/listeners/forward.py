"""Fixed port-forward: every client goes to the configured ``to`` (routes may still redirect or reject)."""

from __future__ import annotations

import socket

from gate.config import ForwardSpec
from gate.dial import literal_family
from gate.errors import GateError
from gate.flow import Flow
from gate.listeners.base import Listener, reset

__all__ = ["ForwardListener"]


class ForwardListener(Listener):
    spec: ForwardSpec

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        """Nothing to read first: when the route leads to an address literal, skip the task entirely."""
        flow.dst = self.spec.to
        decision = self.decide(flow)
        target = decision.upstream or flow.dst
        family = literal_family(target.host) if decision.action != "reject" else None
        if family is None:
            super().accepted(conn, flow)  # rejects and names to resolve take the general path
        else:
            self.connect_and_relay(conn, flow, decision, family)

    async def handle(self, conn: socket.socket, flow: Flow) -> None:
        try:
            upstream = await self.connect(flow)
        except GateError:
            reset(conn)  # no protocol to answer in: a refused upstream looks refused to the client too
            raise
        await self.relay(flow, conn, upstream)
