"""The one loop timer a UDP session table's I/O shell keeps (tproxy_udp, each SOCKS UDP association)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

from gate.udp.sessions import Expired, Open, SessionTable

__all__ = ["TableTimer"]


class TableTimer:
    """Calls ``table.timer(now)`` at its ``next_timer()`` and hands each action to ``act``. ``schedule``
    after anything that may change the table's next deadline; a timer that fires early finds nothing due."""

    __slots__ = ("_act", "_handle", "_loop", "_table")

    def __init__(self, loop: asyncio.AbstractEventLoop, table: SessionTable[Any],
                 act: Callable[[Open | Expired[Any]], Any]) -> None:
        self._loop = loop
        self._table = table
        # weakly: the shell owns this timer, and a cycle would keep a closed shell (and whatever it
        # still holds) alive until the cyclic collector runs
        self._act = weakref.WeakMethod(act)
        self._handle: asyncio.TimerHandle | None = None

    @property
    def armed(self) -> bool:
        """A deadline is pending (for tests: nothing left means no wake-up)."""
        return self._handle is not None

    def schedule(self) -> None:
        when = self._table.next_timer()
        if when is None:
            self.cancel()
        elif self._handle is None or self._handle.when() > when:
            self.cancel()
            self._handle = self._loop.call_at(when, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        act = self._act()
        if act is None:
            return
        for action in self._table.timer(self._loop.time()):
            act(action)
        self.schedule()
