"""The session side of the kernel fast path: hand a routed UDP session to the kernel, count it, end it.

A ``tproxy_udp`` session whose route is offloadable (``direct`` from the client's own address, see
``Route.offloadable``) has nothing left for the gate to do on its bytes once it is routed, so its two
5-tuples go into the capture table's fast path sets (tproxy.offload) and the kernel forwards the rest.
The session stays in the listener's table, its sockets open (a straggler that still reaches user space
is relayed as before), and this module:
- polls the sets once per sweep interval and adds the element counters' progress to the flow's
  bytes (so the table's idle check sees the client's traffic, and the record reports it);
- ends the session when the client -> server element expired (the kernel's idle timeout is the
  session_timeout, refreshed by each of the client's packets: the same rule as in user space),
  re-adding a server -> client element that expired on its own while the client still sends.
The sets exist only when the capture rules were built with them (router role, nftables; see
gate.capture.fastpath_of): the first offload finds out, and without them the listener relays as before.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gate.deadlines import sweep_interval
from gate.flow import Flow
from gate.router import Decision
from tproxy.offload import Counts, FastpathNft, Tuple5, payload_bytes
from tproxy.rules import NFT_TABLE

__all__ = ["Offloaded", "UdpOffload"]

log = logging.getLogger("ugate")
NO_COUNTS = Counts(0, 0)


def _tuple(flow: Flow) -> Tuple5:
    """The client -> server tuple, addresses spelled as nft lists them."""
    dst = flow.dst
    assert dst is not None
    return Tuple5(str(ipaddress.ip_address(flow.client.host)), flow.client.port, str(ipaddress.ip_address(dst.host)),
                  dst.port)


@dataclass(slots=True)
class Offloaded:
    """One session in the kernel: its tuples and what its counters had reached at the last poll."""

    flow: Flow
    up: Tuple5  # client -> server
    end: Callable[[], None]  # the listener ends the session (its sockets, its record)
    up_counts: Counts = NO_COUNTS
    down_counts: Counts = NO_COUNTS

    @property
    def down(self) -> Tuple5:
        return self.up.reverse()


class UdpOffload:
    """One listener's offloaded sessions (one IP version: the listener's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, version: int, session_timeout: float,
                 nft_factory: Callable[[], FastpathNft] = lambda: FastpathNft(NFT_TABLE)) -> None:
        self.loop = loop
        self.version = version
        self.interval = sweep_interval(session_timeout)
        self._factory = nft_factory
        self._nft: FastpathNft | None = None
        self.available: bool | None = None  # None: not tried yet
        self.sessions: dict[Tuple5, Offloaded] = {}
        self._timer: asyncio.TimerHandle | None = None

    def _ready(self) -> bool:
        if self.available is None:
            try:
                self._nft = self._factory()
                self._nft.listing(self.version)
                self.available = True
            except (OSError, ValueError) as e:
                log.info("kernel fast path unavailable (the capture rules have no fast path sets): %s", e)
                self.available = False
        return bool(self.available)

    def offer(self, decision: Decision, flow: Flow, end: Callable[[], None]) -> bool:
        """Offload the session of ``flow`` if its route allows and the sets exist; True if done."""
        route, dst = decision.route, flow.dst
        if route is None or not route.offloadable or flow.upstream is not None or dst is None:
            return False
        if not self._ready():
            return False
        assert self._nft is not None
        up = _tuple(flow)
        if up in self.sessions:
            return False
        try:
            self._nft.add([up, up.reverse()])
        except OSError as e:  # the set is full (MAX_ELEMENTS), or the table went away: stays in user space
            log.warning("kernel fast path: cannot add %s: %s", flow.client, e)
            return False
        self.sessions[up] = Offloaded(flow, up, end)
        flow.path = "kernel"
        if self._timer is None:
            self._timer = self.loop.call_later(self.interval, self._poll)
        return True

    def _poll(self) -> None:
        self._timer = None
        assert self._nft is not None
        try:
            live, counts = self._nft.listing(self.version)
        except OSError as e:
            log.warning("kernel fast path: cannot read the sets: %s", e)
            live, counts = set(), {}
        ended = []
        for up, item in list(self.sessions.items()):
            self._count(item, counts)
            if up not in live:
                ended.append(item)
            elif item.down not in live:
                self._readd(item.down)
        for item in ended:
            item.end()  # comes back through forget()
        if self.sessions:
            self._timer = self.loop.call_later(self.interval, self._poll)

    def _readd(self, t: Tuple5) -> None:
        assert self._nft is not None
        try:
            self._nft.delete([t])  # its count element stays until the session ends: delete and add both
            self._nft.add([t])
        except OSError as e:
            log.debug("kernel fast path: re-adding %s: %s", t, e)

    def _count(self, item: Offloaded, counts: dict[Tuple5, Counts]) -> None:
        """Add what the kernel forwarded since the last poll to the flow (counters only grow; one that
        went back to zero was re-added)."""
        for t, attr, last in ((item.up, "up", item.up_counts), (item.down, "down", item.down_counts)):
            now = counts.get(t)
            if now is None:
                continue
            if now.packets < last.packets:
                last = NO_COUNTS
            delta = payload_bytes(t, Counts(now.packets - last.packets, now.bytes - last.bytes))
            if attr == "up":
                item.flow.bytes_up += delta
                item.up_counts = now
            else:
                item.flow.bytes_down += delta
                item.down_counts = now

    def forget(self, flow: Flow) -> str | None:
        """The session of ``flow`` ends (expired here, idle in the table, or shutdown): read its final
        counts, remove its elements; returns the record's detail (the kernel's packet counts)."""
        dst = flow.dst
        if dst is None or self._nft is None:
            return None
        item = self.sessions.pop(_tuple(flow), None)
        if item is None:
            return None
        try:
            _, counts = self._nft.listing(self.version)
            self._count(item, counts)
        except OSError:
            pass  # the table is gone (rules cleared): the last poll's figures stand
        self._nft.delete([item.up, item.down])
        if not self.sessions and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return (f"kernel fast path: {item.up_counts.packets} packets up, {item.down_counts.packets} down "
                "forwarded by the kernel")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._nft is not None:
            self._nft.close()
