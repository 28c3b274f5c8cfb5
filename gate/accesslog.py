"""The access log: one JSON line per flow, written when the flow ends."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

__all__ = ["AccessLog"]


class AccessLog:
    """Writes to stderr, a file (appended, line-buffered), or nowhere (``"off"``)."""

    def __init__(self, target: str) -> None:
        self._path: str | None = None  # the file we own, if any
        self._stream: TextIO | None
        if target == "off":
            self._stream = None
        elif target == "stderr":
            self._stream = sys.stderr
        else:
            self._path = target
            self._stream = self._open(target)

    @staticmethod
    def _open(path: str) -> TextIO:
        return open(path, "a", buffering=1)  # line-buffered: a record is on disk when its flow ends

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is not None:
            self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")

    def reopen(self) -> None:
        """Open the file at its path again (logrotate renamed the old one); no-op for stderr and off.

        The new file is opened before the old one is closed: if that fails (OSError), records keep going
        to the old file rather than nowhere.
        """
        if self._path is None or self._stream is None:
            return
        fresh = self._open(self._path)
        old, self._stream = self._stream, fresh
        old.close()

    def close(self) -> None:
        if self._path is not None and self._stream is not None:
            self._stream.close()
        self._stream = None
