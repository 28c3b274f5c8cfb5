"""Interceptors the tests route flows through (gate/intercept.py); events go to $UGATE_TEST_EVENTS."""

from __future__ import annotations

import json
import os

from gate.intercept import Event


def _note(event: Event) -> None:
    path = os.environ.get("UGATE_TEST_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": event.kind, "flow": event.flow.id, "rule": event.flow.rule,
                                "bytes": len(event.data), "reason": event.reason}) + "\n")


def shout(event: Event) -> bytes | None:
    """Answers upper-cased; requests pass; every event noted."""
    _note(event)
    return event.data.upper() if event.kind == "down" else None


def boom(event: Event) -> bytes | None:
    """Raises on a chunk that says boom: that flow is reset, the others go on."""
    if event.kind == "up" and b"boom" in event.data:
        raise RuntimeError("boom seen")
    return None


def no_secrets(event: Event) -> bytes | None:
    """Drops the client's chunks that mention a secret."""
    return b"" if event.kind == "up" and b"secret" in event.data else None


def fails_to_open(event: Event) -> bytes | None:
    if event.kind == "open":
        raise ValueError("not today")
    return None


def wrong_type(event: Event) -> bytes | None:
    return "text" if event.kind == "up" else None  # type: ignore[return-value]
