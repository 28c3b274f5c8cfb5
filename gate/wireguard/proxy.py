"""Mode 1 of sharing the ICE port with WireGuard: a user-space relay. Each WireGuard peer's endpoint is a
loopback socket of ours; what WireGuard sends there leaves from the ICE socket to the selected pair's
remote, and the WireGuard datagrams the ICE socket receives from that remote go to WireGuard's listen port
from this socket (so WireGuard sees one constant endpoint, whatever ICE selects).

Works with any WireGuard (kernel or user space) and needs no firewall rules, at the cost of two extra
socket hops per datagram in ugate's process. Only WireGuard's message types pass either way
(gate.wireguard.demux), only from WireGuard's listen port on loopback and from the selected remote;
nothing is queued (a datagram that cannot be sent now is dropped, as the network would).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, cast

from gate.wireguard.demux import Datagram, classify
from gate.wireguard.ice import IceAgent

__all__ = ["LOOPBACK", "WgProxy"]

LOOPBACK = "127.0.0.1"


class WgProxy(asyncio.DatagramProtocol):
    """The loopback endpoint of one WireGuard peer, relaying to and from its ICE agent."""

    def __init__(self, agent: IceAgent, listen_port: int, remote: tuple[str, int], counts: Counter[str]) -> None:
        self.agent = agent
        self.listen_port = listen_port  # WireGuard's (updated when it changes)
        self.remote = remote  # the selected pair's remote: the only source we relay from
        self.counts = counts
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, agent: IceAgent, listen_port: int, remote: tuple[str, int],
                   counts: Counter[str]) -> tuple[WgProxy, int]:
        """The relay and its loopback port (WireGuard's endpoint for the peer)."""
        loop = asyncio.get_running_loop()
        transport, proxy = await loop.create_datagram_endpoint(
            lambda: cls(agent, listen_port, remote, counts), local_addr=(LOOPBACK, 0))
        agent.relay_wireguard(proxy.from_ice)
        return proxy, int(transport.get_extra_info("sockname")[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # (uvloop's is not a subclass)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """From WireGuard: out through the ICE socket."""
        if addr[0] != LOOPBACK or addr[1] != self.listen_port or classify(data) != Datagram.WIREGUARD:
            self.counts["proxy_refused"] += 1
            return
        self.counts["wireguard_out" if self.agent.send(data) else "wireguard_dropped"] += 1

    def from_ice(self, data: bytes, addr: tuple[str, int]) -> None:
        """From the remote, through the ICE socket: to WireGuard."""
        if addr != self.remote or self.transport is None or self.transport.is_closing():
            self.counts["proxy_refused"] += 1
            return
        self.transport.sendto(data, (LOOPBACK, self.listen_port))

    def close(self) -> None:
        self.agent.relay_wireguard(None)
        if self.transport is not None:
            self.transport.close()
