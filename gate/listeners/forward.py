"""Fixed port-forward: every client goes to the configured ``to`` (routes may still redirect or reject)."""

from __future__ import annotations

import socket

from gate.config import ForwardSpec
from gate.flow import Flow
from gate.listeners.tcp import TcpListener

__all__ = ["ForwardListener"]


class ForwardListener(TcpListener):
    spec: ForwardSpec

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        flow.dst = self.spec.to
        self.runner.forward(conn, flow)
