"""The socket side of one mesh stream: an asyncio protocol on the upstream (or socketpair) socket that
moves bytes between it and its HTTP/2 stream, with backpressure both ways, half-close and resets.

Talks to its connection only through ``Tunnel`` (what gate.mesh.session.Session offers a bridge), so
this module needs no import of the session.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Protocol, cast

import h2.errors

__all__ = ["SOCKET_WRITE_HIGH", "Bridge", "Tunnel", "abort_with_reset"]

SOCKET_WRITE_HIGH = 4 << 20  # a socket's write buffer above this holds back the stream's credit


def abort_with_reset(transport: asyncio.Transport) -> None:
    """Cut a bridged socket so that a TCP peer sees a reset, not a FIN that would look complete."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # the socket is already gone: abort() is all there is to do
    transport.abort()


class Tunnel(Protocol):
    """What a bridge asks of the HTTP/2 connection its stream belongs to."""

    loop: asyncio.AbstractEventLoop
    pending: int  # bytes read ahead by all of the connection's bridges (MAX_PENDING bounds it)

    def acknowledge(self, stream_id: int, credit: int) -> None: ...

    def drain(self, bridge: Bridge) -> None: ...

    def forget(self, stream_id: int) -> None: ...

    def rebalance(self) -> None: ...

    def reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None: ...


class Bridge(asyncio.Protocol):
    """The socket side of one stream (an asyncio protocol on the socket)."""

    def __init__(self, session: Tunnel, stream_id: int, on_closed: Callable[[Bridge], None] | None = None):
        self.session = session
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.eof_pending = False  # the socket said FIN; END_STREAM follows the pending bytes
        self.local_ended = False  # END_STREAM sent
        self.remote_ended = False  # END_STREAM received (FIN written to the socket)
        self.reading_paused = False
        self.write_paused = False
        self.unacked = 0  # stream credit held back: the socket's write buffer is full, or no socket yet
        self.bytes_to_stream = 0
        self.bytes_to_socket = 0
        self.last_active = session.loop.time()
        self.error: str | None = None
        self.closed = False
        self.early: list[bytes] = []  # DATA that came before the socket was attached (bounded: its
        # credit is held, so the peer can send the stream's window ahead of the connect and no more)
        self.on_closed = on_closed
        self.on_abort: Callable[[], None] | None = None  # makes the socket's far end see a reset

    @property
    def answered(self) -> bool:
        """The stream was answered and bridged (a reset after this is not a rapid reset)."""
        return self.transport is not None

    # -- asyncio.Protocol (the socket) ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.closed:  # the stream was reset or the tunnel lost while the socket was being attached
            self._reset_socket()
            return
        transport.set_write_buffer_limits(high=SOCKET_WRITE_HIGH)
        for data in self.early:
            transport.write(data)
            self.bytes_to_socket += len(data)
        self.early.clear()
        if self.unacked and not self.write_paused:  # the early bytes left: their credit goes back
            self.session.acknowledge(self.stream_id, self.unacked)
            self.unacked = 0
        if self.remote_ended and transport.can_write_eof():
            transport.write_eof()
        self.session.drain(self)  # END_STREAM already due (a socket attached half-closed) or nothing

    def data_received(self, data: bytes) -> None:
        self.last_active = self.session.loop.time()
        self.pending += data
        self.session.pending += len(data)
        self.session.drain(self)

    def eof_received(self) -> bool:
        self.eof_pending = True
        self.session.drain(self)
        return True  # keep the socket open for the other direction

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.unacked:
            self.session.acknowledge(self.stream_id, self.unacked)
            self.unacked = 0

    def connection_lost(self, exc: Exception | None) -> None:
        if not (self.local_ended and self.remote_ended):  # the socket went away mid-flow
            self.error = self.error or (f"socket error: {exc}" if exc else "socket closed")
            self.session.reset(self.stream_id, h2.errors.ErrorCodes.CANCEL)
        self._finished()

    # -- from the session (the stream) ------------------------------------------------------------

    def deliver(self, data: bytes, credit: int) -> None:
        self.last_active = self.session.loop.time()
        if self.transport is None:  # not attached yet: bounded by the window, since the credit waits
            self.early.append(data)
            self.unacked += credit
            return
        if self.transport.is_closing():
            self.session.acknowledge(self.stream_id, credit)
            return
        self.transport.write(data)
        self.bytes_to_socket += len(data)
        if self.write_paused:
            self.unacked += credit
        else:
            self.session.acknowledge(self.stream_id, credit)

    def remote_end(self) -> None:
        self.remote_ended = True
        if self.transport is not None and not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
        self.close_if_done()

    def close_if_done(self) -> None:
        if self.local_ended and self.remote_ended and self.transport is not None:
            self.transport.close()  # flushes what is buffered first

    def abort(self, reason: str) -> None:
        """The stream was reset or the connection lost: reset the socket (RST, not FIN)."""
        self.error = self.error or reason
        self.local_ended = self.remote_ended = True
        self.early.clear()
        on_abort, self.on_abort = self.on_abort, None
        if on_abort is not None:
            on_abort()
        if self.transport is not None:
            self._reset_socket()
        else:
            self._finished()

    def _reset_socket(self) -> None:
        assert self.transport is not None
        abort_with_reset(self.transport)

    def _finished(self) -> None:
        if not self.closed:
            self.closed = True
            self.early.clear()
            self.session.pending -= len(self.pending)
            self.pending.clear()
            self.session.forget(self.stream_id)
            self.session.rebalance()  # its bytes no longer count: paused streams may read again
            if self.unacked:  # held credit: the connection's share must come back, or it stalls
                self.session.acknowledge(self.stream_id, self.unacked)
                self.unacked = 0
            if self.on_closed is not None:
                self.on_closed(self)
