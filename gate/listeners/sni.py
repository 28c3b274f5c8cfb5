"""SNI ingress (``sni``): TLS routed by its server name without terminating it (sniproxy-style).

The destination is ``<SNI>:<port>`` (routes may send a name to a fixed upstream instead); a flow with
no TLS ClientHello or no server name goes to ``default`` if one is set, else it is closed.
"""

from __future__ import annotations

import socket

from gate.addr import Endpoint
from gate.config import SniSpec
from gate.flow import Flow
from gate.listeners.forward import ForwardListener

__all__ = ["SniListener"]


class SniListener(ForwardListener):
    spec: SniSpec  # type: ignore[assignment]

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        # TLS clients speak first: wait for the ClientHello as long as any handshake may take
        self.sniff_then(conn, flow, self.spec.timeouts.handshake, lambda: self._by_name(conn, flow))

    def _by_name(self, conn: socket.socket, flow: Flow) -> None:
        if flow.protocol == "tls" and flow.sni:
            flow.dst = Endpoint(flow.sni, self.spec.port)
        elif self.spec.default is not None:
            flow.dst = self.spec.default
        else:
            self.refuse(conn, flow, "no TLS server name (and no default)")
            return
        if self.ctx.is_own(flow.dst):
            self.refuse(conn, flow, "refused: the destination is ugate itself (a loop)")
            return
        self._route_accepted(conn, flow)
