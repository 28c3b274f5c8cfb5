"""SNI ingress (``sni``): TLS routed by its server name without terminating it (sniproxy-style).

The destination is ``<SNI>:<port>`` (routes may send a name to a fixed upstream instead); a flow with
no TLS ClientHello or no server name goes to ``default`` if one is set, else it is closed. A name that
resolves to this gate's own listeners is refused by the upstream opener (no loops).
"""

from __future__ import annotations

import socket

from gate.addr import Endpoint
from gate.config import SniSpec
from gate.flow import Close, Flow
from gate.listeners.tcp import TcpListener

__all__ = ["SniListener"]


class SniListener(TcpListener):
    spec: SniSpec

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        # TLS clients speak first: wait for the ClientHello as long as any handshake may take
        self.runner.sniff(conn, flow, self.spec.timeouts.handshake, lambda: self._by_name(conn, flow))

    def _by_name(self, conn: socket.socket, flow: Flow) -> None:
        if flow.protocol == "tls" and flow.sni:
            flow.dst = Endpoint(flow.sni, self.spec.port)
        elif self.spec.default is not None:
            flow.dst = self.spec.default
        else:
            self.runner.refuse(conn, flow, Close.REFUSED, "no TLS server name (and no default)")
            return
        self.runner.route(conn, flow)
