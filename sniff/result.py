"""The outcomes every sniffer shares: a frozen result, NEED_MORE, or NotThisProtocol."""

from __future__ import annotations

__all__ = ["NEED_MORE", "NeedMore", "NotThisProtocol"]


class NeedMore:
    """The bytes so far are a valid prefix: read more (within the caller's byte and time budget)."""

    _instance: NeedMore | None = None

    def __new__(cls) -> NeedMore:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()


class NotThisProtocol(ValueError):
    """The bytes cannot be this protocol (or break it): try another sniffer, or route as unknown."""
