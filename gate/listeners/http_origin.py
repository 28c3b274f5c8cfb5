"""The HTTP proxy's side towards origins: one connection per client connection with its own h11 client
state, kept for the client's next request while it goes the same way, and the request as sent, kept
(when idempotent and small) so it can be sent again on a fresh connection if the origin had closed the
reused one.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import h11

from gate.addr import Endpoint
from gate.errors import ClientProtocolError, UpstreamError
from gate.flow import Flow
from gate.proto.http import readable

__all__ = ["MAX_HEAD", "MAX_REPLAY", "NoResponse", "OriginConnection", "OriginSession", "Outgoing"]

# A request or response head larger than this is refused (431 / 502): no legitimate client needs more,
# and it bounds what one connection can make us buffer.
MAX_HEAD = 64 * 1024
# The body of an idempotent request is kept up to this size while it goes over a reused upstream
# connection, so that it can be sent again on a fresh one if the origin had closed the reused one;
# a larger body is only streamed (and such a request is not retried).
MAX_REPLAY = 64 * 1024


class NoResponse(UpstreamError):
    """The upstream connection failed before any byte of the response came: on a reused connection,
    most likely the origin had closed it while it was idle (RFC 9112 9.3.1), so a retry may work."""


class Outgoing:
    """A request as it goes upstream. An idempotent one keeps its body (up to MAX_REPLAY) so that it
    can be sent again; ``complete`` once the client's whole body was read."""

    def __init__(self, head: h11.Request, keep: bool) -> None:
        self.head = head
        self.kept: list[h11.Data | h11.EndOfMessage] | None = [] if keep else None
        self.kept_bytes = 0
        self.complete = False

    @property
    def replayable(self) -> bool:
        """Everything of the request read so far is kept: it can be sent again as it was."""
        return self.kept is not None

    def add(self, event: h11.Data | h11.EndOfMessage) -> None:
        self.complete = isinstance(event, h11.EndOfMessage)
        if self.kept is None:
            return
        if isinstance(event, h11.Data):
            self.kept_bytes += len(event.data)
            if self.kept_bytes > MAX_REPLAY:
                self.kept = None
                return
        self.kept.append(event)


class OriginConnection:
    """One connection to an origin (or fixed upstream) with its own h11 client state."""

    def __init__(self, way: tuple[str | None, Endpoint], sock: socket.socket) -> None:
        self.way = way
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.loop = asyncio.get_running_loop()
        self.reused = False  # a request was answered on it before: the origin may have closed it since

    async def send(self, event: Any, flow: Flow) -> None:
        try:
            data = self.h11.send(event)
        except h11.LocalProtocolError as e:
            raise ClientProtocolError(f"request cannot be forwarded: {readable(str(e))}") from None
        if data:
            try:
                await self.loop.sock_sendall(self.sock, data)
            except OSError as e:  # nothing of a response was read yet (it is read once the request is sent)
                raise NoResponse(f"upstream write failed: {e.strerror}") from None
            flow.bytes_up += len(data)

    def idle_and_open(self) -> bool:
        """Whether this idle connection can take the next request: not if the origin closed it (an
        end-of-file or reset is queued) or sent bytes no request asked for."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing queued: open and quiet
        except OSError:
            pass
        return False


class OriginSession:
    """Keeps the last upstream connection of a client connection for reuse by its next request."""

    def __init__(self) -> None:
        self.current: OriginConnection | None = None

    async def get(self, way: tuple[str | None, Endpoint],
                  connect: Callable[[], Awaitable[socket.socket]]) -> OriginConnection:
        current = self.current
        if current is not None and current.way == way and current.h11.our_state is h11.IDLE \
                and current.idle_and_open():
            return current
        self.close()
        self.current = OriginConnection(way, await connect())
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.sock.close()
            self.current = None
