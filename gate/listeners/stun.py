"""STUN server (``stun``): answers Binding requests with the address a request came from, so a public
gate can be the STUN server of its NATed peers (their server-reflexive ICE candidates).

Stateless: each datagram gets its answer or nothing (gate.proto.stun), so nothing a sender does can
grow. Requests are counted, not logged one by one; the counts are logged when the listener stops.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from gate.config import StunSpec
from gate.context import Context
from gate.proto.stun import binding_response
from tproxy.sockopts import unmap

__all__ = ["StunListener"]

log = logging.getLogger("ugate")

DATAGRAMS_PER_WAKEUP = 64  # fairness with the other sockets of the loop
MAX_REQUEST = 2048  # a Binding request is 20 bytes plus a few attributes; longer datagrams are not read whole


class StunListener:
    """One UDP socket answering STUN Binding requests; same lifecycle as the other listeners."""

    def __init__(self, spec: StunSpec, ctx: Context) -> None:
        self.spec = spec
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.answered = 0
        self.ignored = 0  # not a Binding request (other STUN, other protocols, truncated)

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.spec.listen.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            if self.ctx.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.spec.listen.host, self.spec.listen.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_datagram)
        log.info("listener %s (%s) on %s", self.spec.name, self.spec.kind, self.spec.listen)

    def _on_datagram(self) -> None:
        assert self.sock is not None
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                data, peer = self.sock.recvfrom(MAX_REQUEST)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error queued on the socket
                log.debug("%s: recv: %s", self.spec.name, e)
                continue
            answer = binding_response(data, unmap(peer[0]), peer[1])
            if answer is None:
                self.ignored += 1
                continue
            try:
                self.sock.sendto(answer, peer)
            except OSError as e:  # a full buffer or an unreachable sender: it asks again
                log.debug("%s: answer to %s: %s", self.spec.name, peer, e)
                continue
            self.answered += 1

    def stop_accepting(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def drain(self, timeout: float) -> None:
        log.info("%s: %d Binding requests answered, %d other datagrams ignored", self.spec.name, self.answered,
                 self.ignored)
