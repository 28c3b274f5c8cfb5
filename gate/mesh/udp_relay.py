"""The serving side of one tunnelled UDP flow's upstream, whatever carried it (a CONNECT-UDP stream, a
WebRTC channel: gate.mesh.inbound serves both through ``transport.DatagramStream``): a UDP socket opened
through the Opener (routes, loop guard, hop limit, mark), connected to the one destination the flow names,
so only that destination's answers come back (RFC 9298's proxy is "connected" to its target)."""

from __future__ import annotations

import asyncio
import logging
import socket

from gate.dial import literal_family, resolve
from gate.errors import RefusedByPolicy, UpstreamUnreachable
from gate.flow import Flow
from gate.mesh.transport import Datagrams
from gate.upstream import LOOP, Opener, Upstream

__all__ = ["UdpRelay"]

log = logging.getLogger("ugate")

MAX_DATAGRAM = 65535
DATAGRAMS_PER_WAKEUP = 64  # fairness between streams sharing the loop


class UdpRelay:
    """Datagrams between a connected UDP socket and a tunnel (``Datagrams``); counts them in the flow."""

    __slots__ = ("_buffer", "flow", "loop", "sock", "tunnel")

    def __init__(self, sock: socket.socket, flow: Flow) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.flow = flow
        self.tunnel: Datagrams | None = None
        self._buffer = bytearray(MAX_DATAGRAM)

    @classmethod
    async def open(cls, opener: Opener, flow: Flow) -> UdpRelay:
        """Route ``flow`` and open its socket; a GateError (answered to the peer) if it may not go."""
        decision = opener.decide(flow)
        upstream = opener.open_udp(decision, flow)
        if not isinstance(upstream, Upstream):  # routed via a further peer
            upstream.close()
            raise RefusedByPolicy("UDP is not relayed on through a further peer")
        sock = upstream.sock
        try:
            target = flow.upstream or flow.dst
            assert target is not None
            if literal_family(target.host) is None:  # a name: the socket's family decides (open_udp)
                family = sock.family
                found = [a for f, a in await resolve(target, opener.connect_timeout) if f == family]
                allowed = [a for a in found if a not in opener.own]
                if not allowed:
                    raise (RefusedByPolicy(f"{target.host}: {LOOP}") if found
                           else UpstreamUnreachable(f"{target.host}: no address of the socket's family"))
                target = allowed[0]
            sock.connect((target.host, target.port))
        except OSError as e:
            sock.close()
            raise UpstreamUnreachable(f"UDP to {flow.dst}: {e.strerror}") from None
        except BaseException:
            sock.close()
            raise
        return cls(sock, flow)

    def start(self, tunnel: Datagrams) -> None:
        self.tunnel = tunnel
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def to_upstream(self, payload: bytes) -> None:
        try:
            self.sock.send(payload)
        except OSError as e:  # full, or an ICMP error of an earlier datagram: dropped, as a router would
            log.debug("mesh udp: send to %s: %s", self.flow.dst, e)
            return
        self.flow.bytes_up += len(payload)

    def _readable(self) -> None:
        tunnel, buffer, total = self.tunnel, self._buffer, 0
        assert tunnel is not None
        view = memoryview(buffer)
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                n = self.sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP port unreachable and the like
                continue
            if tunnel.send(view[:n]):
                total += n
        self.flow.bytes_down += total

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if self.tunnel is not None:
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
