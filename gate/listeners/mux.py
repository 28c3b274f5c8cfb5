"""One port, several protocols (sslh-style): SOCKS5/4a and the HTTP proxy are served as on their own
listeners, TLS is routed by SNI without terminating it, SSH goes to ``ssh``, the rest to ``default``.
The first bytes decide; they are replayed to whichever handler takes the flow.
"""

from __future__ import annotations

import socket

from gate.addr import Endpoint
from gate.config import MuxSpec
from gate.context import Context
from gate.errors import ClientProtocolError
from gate.flow import Flow
from gate.listeners.http_proxy import HttpProxy
from gate.listeners.socks import Socks
from gate.listeners.tcp import TcpListener
from gate.runner import reset

__all__ = ["MuxListener"]


class MuxListener(TcpListener):
    spec: MuxSpec

    def __init__(self, spec: MuxSpec, ctx: Context) -> None:
        super().__init__(spec, ctx)
        self.socks = Socks(spec, self.runner)
        self.http = HttpProxy(spec, self.runner)

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        # clients of every protocol served here speak first: wait as long as a handshake may take
        self.runner.sniff(conn, flow, self.spec.timeouts.handshake,
                          lambda: self.runner.handshake(conn, flow, self._serve))

    async def _serve(self, conn: socket.socket, flow: Flow) -> None:
        if flow.protocol == "socks":
            await self.socks.serve(conn, flow)
        elif flow.protocol == "http":
            await self.http.serve(conn, flow)
        else:
            await self._pass_through(conn, flow)

    async def _pass_through(self, conn: socket.socket, flow: Flow) -> None:
        """TLS by SNI, SSH, or the default: a plain relay after routing."""
        target: Endpoint | None
        if flow.protocol == "tls" and flow.sni:
            target = Endpoint(flow.sni, self.spec.tls_port)
        elif flow.protocol == "ssh":
            target = self.spec.ssh or self.spec.default
        else:
            target = self.spec.default
        if target is None:
            reset(conn)
            raise ClientProtocolError(f"nothing serves {flow.protocol or 'this'} on this port")
        flow.dst = target
        await self.runner.connect_and_relay_or_reset(conn, flow)
