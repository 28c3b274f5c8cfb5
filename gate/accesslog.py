"""The access log: one JSON line per flow, written when the flow ends."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

__all__ = ["AccessLog"]


class AccessLog:
    """Writes to stderr, a file (appended, line-buffered), or nowhere (``"off"``)."""

    def __init__(self, target: str) -> None:
        self._own = False
        self._stream: TextIO | None
        if target == "off":
            self._stream = None
        elif target == "stderr":
            self._stream = sys.stderr
        else:
            self._stream = open(target, "a", buffering=1)  # noqa: SIM115 - lives as long as the gateway
            self._own = True

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is not None:
            self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._own and self._stream is not None:
            self._stream.close()
        self._stream = None
