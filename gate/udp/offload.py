"""The session side of the kernel fast path: hand a routed UDP session to the kernel, count it, end it.

A ``tproxy_udp`` session whose route is offloadable (``direct`` from the client's own address, see
``Route.offloadable``) has nothing left for the gate to do on its bytes once it is routed, so its two
5-tuples go into the capture table's fast path sets (tproxy.offload) and the kernel forwards the rest.
The session then leaves the listener's table and its sockets close: a UDP socket connected to one of the
tuples would get the packets by early demux however the rules accept them (seen: the kernel delivered
them to the gate's sockets, not forwarded). From then on the flow record is this module's:
- it polls the liveness set every quarter of the session_timeout; the flow ends (idle timeout, one
  record) when the client -> server element expired (its timeout is the session_timeout, refreshed by
  each of the client's packets: the same rule as in user space); a server -> client element that
  expired on its own while the client still sends is added again (its count element never expires);
- at the end it reads the two count elements and adds them to the flow's bytes (the record reports
  what the kernel forwarded on top of what the gate relayed first).
A datagram of the session that still reaches user space (after the element expired, before the poll
saw it) opens a new session, as after any idle end.
The sets exist only when the capture rules were built with them (router role, nftables; see
gate.capture.fastpath_of): the first offload finds out, and without them the listener relays as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gate.flow import Close, Flow
from gate.router import Decision
from tproxy.offload import Counts, FastpathNft, Tuple5, canonical, payload_bytes
from tproxy.rules import NFT_TABLE

__all__ = ["Offloaded", "UdpOffload"]

log = logging.getLogger("ugate")
NO_COUNTS = Counts(0, 0)
MIN_POLL = 0.25  # seconds between polls at the least (tests use session timeouts of a second or two)


def _tuple(flow: Flow) -> Tuple5:
    """The client -> server tuple, addresses spelled as nft lists them."""
    dst = flow.dst
    assert dst is not None
    return Tuple5(canonical(flow.client.host), flow.client.port, canonical(dst.host), dst.port)


@dataclass(slots=True)
class Offloaded:
    """One session in the kernel."""

    flow: Flow
    up: Tuple5  # client -> server

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
        # A poll lists the liveness set (~25 us an element with nft 1.0.6, measured: 2,000 elements
        # ~50 ms), so not every second as the table's sweep: a quarter of the timeout, as late as the
        # table's own sweeps are at most (flows end that much after their element expired).
        self.interval = max(session_timeout / 4, MIN_POLL)
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
                self._nft.live(self.version)
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
            live = self._nft.live(self.version)
        except OSError as e:
            log.warning("kernel fast path: cannot read the sets: %s", e)
            live = set()  # the table is gone (rules cleared): the sessions end
        ended = []
        for up, item in self.sessions.items():
            if up not in live:
                ended.append(item)
            elif item.down not in live:
                self._revive(item.down)
        self._end(ended, Close.IDLE)
        if self.sessions:
            self._timer = self.loop.call_later(self.interval, self._poll)

    def _revive(self, t: Tuple5) -> None:
        """The answers' element expired while the client still sends: add it again."""
        assert self._nft is not None
        try:
            self._nft.revive(t)
        except OSError as e:
            log.debug("kernel fast path: re-adding %s: %s", t, e)

    def _end(self, items: list[Offloaded], close: Close, counts: dict[Tuple5, Counts] | None = None) -> None:
        """Read the flows' counters, remove their elements, and end each with its one record: what the
        gate relayed first plus what the kernel forwarded."""
        if not items:
            return
        assert self._nft is not None
        if counts is None:
            try:
                counts = self._nft.counts(t for item in items for t in (item.up, item.down))
            except OSError as e:
                log.warning("kernel fast path: cannot read the counters: %s", e)
                counts = {}
        for item in items:
            self.sessions.pop(item.up, None)
            up, down = counts.get(item.up, NO_COUNTS), counts.get(item.down, NO_COUNTS)
            item.flow.bytes_up += payload_bytes(item.up, up)
            item.flow.bytes_down += payload_bytes(item.down, down)
            self._nft.delete([item.up, item.down])
            self.finish(item.flow, close, f"kernel fast path: {up.packets} packets up, {down.packets} down "
                                          "forwarded by the kernel")

    def shutdown(self) -> None:
        """The gate stops: every offloaded flow ends now, with what the kernel counted so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._nft is None:
            return
        try:
            counts = self._nft.all_counts(self.version)
        except OSError:
            counts = {}  # the table is gone (rules cleared): only what the gate relayed is known
        self._end(list(self.sessions.values()), Close.SHUTDOWN, counts)
        self._nft.close()
        self._nft = None
