"""An example interceptor (see gate/intercept.py and the README's "Interceptors"): logs the first line
each side of a flow sends (an HTTP request line and status line, an SSH banner, a TLS record type) and
how the flow ended, and passes every byte on unchanged.

Use it from a route (run ugate from the repository root, or put ``configs`` on PYTHONPATH and name
``interceptors.audit:first_lines``):

    routes:
      - match: {port: [80]}
        action: direct
        intercept: configs.interceptors.audit:first_lines
"""

from __future__ import annotations

import logging

from gate.intercept import Event

log = logging.getLogger("ugate.intercept")

MAX_LINE = 200  # bytes of a first line that are logged; the rest of a long line is cut
_seen: dict[int, set[str]] = {}  # flow id -> directions whose first line was logged; dropped at close


def first_lines(event: Event) -> bytes | None:
    if event.kind == "open":
        _seen[event.flow.id] = set()
    elif event.kind == "close":
        _seen.pop(event.flow.id, None)
        log.info("flow %d %s -> %s ended: %s", event.flow.id, event.flow.client, event.flow.dst, event.reason)
    elif event.kind not in _seen.get(event.flow.id, {event.kind}):
        _seen[event.flow.id].add(event.kind)
        line = event.data.split(b"\n", 1)[0][:MAX_LINE].rstrip(b"\r")
        text = line.decode("ascii", "replace") if line.isascii() else f"binary, first byte 0x{line[0]:02x}"
        log.info("flow %d %s: %s", event.flow.id, event.kind, text)
    return None  # every chunk passes unchanged
