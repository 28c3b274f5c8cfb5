"""One coarse periodic timer for many deadlines (idle flows, pending connects).

A loop timer per flow costs a timer handle created and cancelled for every connection, which shows in
the connection rate; deadlines of seconds do not need that precision. The sweeper wakes every
``interval`` seconds while it has items and expires those whose deadline passed, so a deadline fires
at most ``interval`` late.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

__all__ = ["Expiring", "Sweeper", "sweep_interval"]

log = logging.getLogger("ugate")


class Expiring(Protocol):
    def deadline(self) -> float:
        """Loop time at which ``expire`` is due (may move later while the item is active)."""
        ...

    def expire(self) -> None:
        """Called once the deadline passed; the item must ``discard`` itself from the sweeper."""
        ...


def sweep_interval(timeout: float) -> float:
    """A quarter of the timeout, at most one second: late by at most 25% (or 1 s)."""
    return min(timeout / 4, 1.0)


class Sweeper:
    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self._loop = loop
        self._interval = interval
        self._items: set[Expiring] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: Expiring) -> None:
        self._items.add(item)
        if self._timer is None:
            self._timer = self._loop.call_later(self._interval, self._sweep)

    def discard(self, item: Expiring) -> None:
        self._items.discard(item)

    def _sweep(self) -> None:
        now = self._loop.time()
        try:
            for item in [item for item in self._items if item.deadline() <= now]:
                try:
                    item.expire()
                except Exception:  # a bug in one item must not stop every other deadline it shares
                    log.exception("expiring %r failed; dropped from its sweeper", item)
                    self._items.discard(item)
        finally:
            self._timer = self._loop.call_later(self._interval, self._sweep) if self._items else None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._items.clear()
