"""The session side of the kernel fast path: hand a routed UDP session to the kernel, count it, end it.

A ``tproxy_udp`` session whose route is offloadable (``direct`` from the client's own address, see
``Route.offloadable``) has nothing left for the gate to do on its bytes once it is routed, so its two
5-tuples go into the capture table's fast path sets (tproxy.offload) and the kernel forwards the rest.
The session then leaves the listener's table and its sockets close: a UDP socket connected to one of the
tuples would get the packets by early demux however the rules accept them (seen: the kernel delivered
them to the gate's sockets, not forwarded). From then on the flow record is this module's:
- it polls the sets once per sweep interval and adds the element counters' progress to the flow's
  bytes (the record reports what the kernel forwarded, on top of what the gate relayed first);
- the flow ends (idle timeout, one record) when the client -> server element expired (its timeout is
  the session_timeout, refreshed by each of the client's packets: the same rule as in user space); a
  server -> client element that expired on its own while the client still sends is added again.
A datagram of the session that still reaches user space (after the element expired, before the poll
saw it) opens a new session, as after any idle end.
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
from gate.flow import Close, Flow
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
    up_counts: Counts = NO_COUNTS  # the elements' counters at the last poll (they restart when re-added)
    down_counts: Counts = NO_COUNTS
    packets_up: int = 0  # what the kernel forwarded, in total
    packets_down: int = 0

    @property
    def down(self) -> Tuple5:
        return self.up.reverse()


class UdpOffload:
    """One listener's offloaded sessions (one IP version: the listener's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, version: int, session_timeout: float,
                 finish: Callable[[Flow, Close, str | None], None],
                 nft_factory: Callable[[], FastpathNft] = lambda: FastpathNft(NFT_TABLE)) -> None:
        self.loop = loop
        self.finish = finish  # Context.finish: the one place flows end
        self.version = version
        self.interval = sweep_interval(session_timeout)
        self._factory = nft_factory
        self._nft: FastpathNft | None = None
        self.available: bool | None = None  # None: not tried yet
        self.sessions: dict[Tuple5, Offloaded] = {}
        self.refused = 0  # sessions the sets had no room for (warned about once, then at debug level)
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

    def wants(self, decision: Decision) -> bool:
        """Whether a session routed so would be offered (the sets may still turn out missing)."""
        route = decision.route
        return route is not None and route.offloadable and self.available is not False

    def offer(self, decision: Decision, flow: Flow) -> bool:
        """Offload the session of ``flow`` if its route allows and the sets exist; True if done (the
        caller then closes the session's sockets, and its flow is this module's to end)."""
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
            self.refused += 1
            (log.debug if self.refused > 1 else log.warning)(
                "kernel fast path: cannot add %s (%d refused so far; it stays in user space): %s",
                flow.client, self.refused, e)
            return False
        self.sessions[up] = Offloaded(flow, up)
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
                self._readd(item)
        for item in ended:
            self._end(item, Close.IDLE)
        if self.sessions:
            self._timer = self.loop.call_later(self.interval, self._poll)

    def _readd(self, item: Offloaded) -> None:
        """The answers' element expired while the client still sends: add it again (its count element
        goes with it, read just before, so the counters restart from zero)."""
        assert self._nft is not None
        try:
            self._nft.delete([item.down])
            self._nft.add([item.down])
            item.down_counts = NO_COUNTS
        except OSError as e:
            log.debug("kernel fast path: re-adding %s: %s", item.down, e)

    def _count(self, item: Offloaded, counts: dict[Tuple5, Counts]) -> None:
        """Add what the kernel forwarded since the last poll to the flow (counters only grow; one that
        went back to zero was re-added)."""
        for t, attr, last in ((item.up, "up", item.up_counts), (item.down, "down", item.down_counts)):
            now = counts.get(t)
            if now is None:
                continue
            packets = now.packets - last.packets
            delta = payload_bytes(t, Counts(packets, now.bytes - last.bytes))
            if attr == "up":
                item.flow.bytes_up += delta
                item.packets_up += packets
                item.up_counts = now
            else:
                item.flow.bytes_down += delta
                item.packets_down += packets
                item.down_counts = now

    def _end(self, item: Offloaded, close: Close, counts: dict[Tuple5, Counts] | None = None) -> None:
        """Remove the flow's elements, add their last counts, and end the flow with its one record."""
        assert self._nft is not None
        self.sessions.pop(item.up, None)
        if counts is not None:
            self._count(item, counts)
        self._nft.delete([item.up, item.down])
        self.finish(item.flow, close, f"kernel fast path: {item.packets_up} packets up, {item.packets_down} down "
                                      "forwarded by the kernel")

    def shutdown(self) -> None:
        """The gate stops: every offloaded flow ends now, with what the kernel counted so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._nft is None:
            return
        try:
            _, counts = self._nft.listing(self.version)
        except OSError:
            counts = {}  # the table is gone (rules cleared): the last poll's figures stand
        for item in list(self.sessions.values()):
            self._end(item, Close.SHUTDOWN, counts)
        self._nft.close()
        self._nft = None
