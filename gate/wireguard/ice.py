"""One ICE agent (aioice) per WireGuard peer, bound to the peer's shared ICE port; aioice's types stay here.

aioice binds every host candidate to an ephemeral port and has no option for a fixed one, but the port
must be the one WireGuard shares (the NAT mapping ICE opens is the one WireGuard then uses), so
``_Agent`` overrides ``get_component_candidates`` (aioice 0.13: host sockets, then a server-reflexive
query per IPv4 host through ``server_reflexive_candidate``) to bind ``(address, port)`` on the addresses
we choose: not loopback and not the WireGuard interface's own (ICE over the tunnel it sets up would be a
loop). The selected pair is read from ``_nominated``, as aiortc does: there is no public accessor.

Every datagram the socket receives is classified (gate.wireguard.demux) and counted; only STUN reaches
aioice. In mode 3 the kernel steers WireGuard away from this socket, so ``counts["wireguard"]`` staying
0 is the proof; in mode 1 WireGuard's datagrams go to the relay (gate.wireguard.proxy). Nothing else is
passed on: it would sit in aioice's receive queue, which has no bound and which nobody reads here.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from collections.abc import Callable
from typing import Any

import ifaddr
from aioice import Candidate, Connection
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import ConnectionClosed, StunProtocol, server_reflexive_candidate

from gate.wireguard.demux import Datagram, classify

__all__ = ["IceAgent", "IceFailed", "host_addresses"]

GATHER_TIMEOUT = 5.0  # seconds for the STUN server's answer (aioice's own default)
MAX_PENDING = 256 << 10  # bytes a relayed socket may hold unsent before datagrams are dropped (UDP: loss)


class IceFailed(ConnectionError):
    """No pair was selected, or the selected one lost consent."""


def host_addresses(exclude_interfaces: tuple[str, ...]) -> list[str]:
    """The IPv4 addresses of this namespace's interfaces, except loopback and ``exclude_interfaces``."""
    out = []
    for adapter in ifaddr.get_adapters():
        if adapter.name in exclude_interfaces:
            continue
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                out.append(ip.ip)
    return out


# What mode 1 does with a WireGuard datagram the ICE socket received: (datagram, its source address)
OnWireguard = Callable[[bytes, tuple[str, int]], None]


def _buffered(transport: asyncio.DatagramTransport) -> int:
    size: int = transport.get_write_buffer_size()  # type: ignore[attr-defined]  # (asyncio's and uvloop's have it)
    return size


class _Counting(StunProtocol):
    def __init__(self, receiver: _Agent) -> None:
        super().__init__(receiver)
        self.agent = receiver

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        datagram = bytes(data) if isinstance(data, bytes) else data.encode()
        kind = classify(datagram)
        self.agent.counts[kind] += 1
        if kind == Datagram.STUN:
            super().datagram_received(data, addr)
        elif kind == Datagram.WIREGUARD and self.agent.on_wireguard is not None:
            self.agent.on_wireguard(datagram, (addr[0], addr[1]))


class _Agent(Connection):
    def __init__(self, port: int, addresses: list[str], counts: Counter[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.port = port
        self.addresses = addresses
        self.counts = counts
        self.on_wireguard: OnWireguard | None = None

    async def get_component_candidates(self, component: int, addresses: list[str],
                                       timeout: int = 5) -> list[Candidate]:
        loop = asyncio.get_running_loop()
        candidates = []
        protocols: list[StunProtocol] = []
        try:
            for address in self.addresses:
                _, counting = await loop.create_datagram_endpoint(lambda: _Counting(self),
                                                                  local_addr=(address, self.port))
                protocol: StunProtocol = counting
                protocol.local_candidate = Candidate(
                    foundation=candidate_foundation("host", "udp", address), component=component, transport="udp",
                    priority=candidate_priority(component, "host"), host=address, port=self.port, type="host")
                candidates.append(protocol.local_candidate)
                protocols.append(protocol)
        except BaseException:
            for protocol in protocols:
                protocol.transport.close()
            raise
        self._protocols += protocols
        if self.stun_server is not None:
            found = await asyncio.gather(*(asyncio.wait_for(server_reflexive_candidate(p, self.stun_server),
                                                            GATHER_TIMEOUT) for p in protocols),
                                         return_exceptions=True)
            candidates += [c for c, _ in (f for f in found if isinstance(f, tuple))]
        return candidates


class IceAgent:
    """ICE with one peer on ``port``: gather, then connect to its candidates; the selected remote address."""

    def __init__(self, controlling: bool, port: int, exclude_interfaces: tuple[str, ...],
                 stun: tuple[str, int] | None) -> None:
        self.counts: Counter[str] = Counter()
        addresses = host_addresses(exclude_interfaces)
        self._conn = _Agent(port, addresses, self.counts, ice_controlling=controlling, components=1,
                            stun_server=stun, use_ipv6=False)

    async def gather(self) -> tuple[str, str, tuple[str, ...]]:
        """Bind the port and gather: (ufrag, pwd, candidate lines). OSError if the port is taken."""
        await self._conn.gather_candidates()
        c = self._conn
        return c.local_username, c.local_password, tuple(x.to_sdp() for x in c.local_candidates)

    async def connect(self, ufrag: str, pwd: str, candidates: tuple[str, ...]) -> tuple[str, int]:
        """Run the checks against the peer's candidates; the selected pair's remote (host, port)."""
        self._conn.remote_username, self._conn.remote_password = ufrag, pwd
        for line in candidates:
            try:
                candidate = Candidate.from_sdp(line)
            except (ValueError, IndexError):
                continue  # one bad line does not spoil the others
            if candidate.component == 1 and candidate.transport.lower() == "udp":
                await self._conn.add_remote_candidate(candidate)
        await self._conn.add_remote_candidate(None)
        try:
            await self._conn.connect()
        except ConnectionError as e:
            raise IceFailed(str(e)) from None
        pair = self._conn._nominated.get(1)
        if pair is None:
            raise IceFailed("no pair nominated")
        host, port = pair.remote_addr
        return str(host), int(port)

    def relay_wireguard(self, on_wireguard: OnWireguard | None) -> None:
        """Mode 1: hand WireGuard datagrams the ICE socket receives to ``on_wireguard`` (None: drop them)."""
        self._conn.on_wireguard = on_wireguard

    def send(self, data: bytes) -> bool:
        """Mode 1: send ``data`` from the ICE socket to the selected pair's remote; False when dropped
        (no pair, or over MAX_PENDING bytes wait in the socket's transport: UDP, so a loss, not a queue)."""
        pair = self._conn._nominated.get(1)
        if pair is None:
            return False
        transport = pair.protocol.transport
        if transport.is_closing() or _buffered(transport) > MAX_PENDING:
            return False
        transport.sendto(data, pair.remote_addr)
        return True

    async def wait_closed(self) -> None:
        """Until the connection ends (consent lost: RFC 7675, about 30 s without answers, or close)."""
        while True:
            event = await self._conn.get_event()
            if event is None or isinstance(event, ConnectionClosed):
                return

    async def close(self) -> None:
        await self._conn.close()
