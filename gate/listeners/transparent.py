"""Transparent TCP listeners: TPROXY (``tproxy``) and REDIRECT (``redirect``).

Both learn the original destination at accept and then behave as a port-forward to it; they differ
only in where that destination comes from.
"""

from __future__ import annotations

import socket

from gate.addr import Endpoint
from gate.config import RedirectSpec, TproxySpec
from gate.flow import Flow
from gate.listeners.forward import ForwardListener
from tproxy.sockopts import OriginalDstUnavailable, original_dst, unmap

__all__ = ["RedirectListener", "TproxyListener"]


class TproxyListener(ForwardListener):
    """IP_TRANSPARENT listener: TPROXY delivers connections for any address, and the accepted socket's
    local address is where the client was going."""

    spec: TproxySpec  # type: ignore[assignment]
    transparent = True

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        host, port = conn.getsockname()[:2]
        flow.dst = Endpoint(unmap(host), port)
        self.route_without_handshake(conn, flow)


class RedirectListener(ForwardListener):
    """Plain listener behind iptables/nftables REDIRECT: conntrack knows the original destination."""

    spec: RedirectSpec  # type: ignore[assignment]

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        try:
            host, port = original_dst(conn)
        except OriginalDstUnavailable:
            host, port = conn.getsockname()[:2]  # a direct connection: the destination is us
        flow.dst = Endpoint(unmap(host), port)
        if flow.dst == Endpoint(unmap(conn.getsockname()[0]), conn.getsockname()[1]):
            self.refuse(conn, flow, "refused: not redirected (a direct connection to the listener)")
            return
        self.route_without_handshake(conn, flow)
