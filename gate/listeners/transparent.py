"""Transparent TCP listeners: TPROXY (``tproxy``) and REDIRECT (``redirect``).

Both learn the original destination at accept and then behave as a port-forward to it; they differ
only in where that destination comes from.
"""

from __future__ import annotations

import socket

from gate.addr import Endpoint
from gate.config import RedirectSpec, TproxySpec
from gate.flow import Close, Flow
from gate.listeners.tcp import TcpListener
from tproxy.sockopts import OriginalDstUnavailable, original_dst, unmap

__all__ = ["RedirectListener", "TproxyListener"]


class TproxyListener(TcpListener):
    """IP_TRANSPARENT listener: TPROXY delivers connections for any address, and the accepted socket's
    local address is where the client was going."""

    spec: TproxySpec
    transparent = True

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        host, port = conn.getsockname()[:2]
        flow.dst = Endpoint(unmap(host), port)
        self.runner.forward(conn, flow)


class RedirectListener(TcpListener):
    """Plain listener behind iptables/nftables REDIRECT: conntrack knows the original destination."""

    spec: RedirectSpec

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        local = conn.getsockname()
        try:
            host, port = original_dst(conn)
        except OriginalDstUnavailable:
            host, port = local[:2]  # a direct connection: the destination is us
        flow.dst = Endpoint(unmap(host), port)
        if flow.dst == Endpoint(unmap(local[0]), local[1]):
            self.runner.refuse(conn, flow, Close.REFUSED, "not redirected (a direct connection to the listener)")
            return
        self.runner.forward(conn, flow)
