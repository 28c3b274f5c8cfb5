"""Move bytes both ways between two connected stream sockets, driven by event-loop callbacks.

Two paths, one state machine per direction ("pump"):
- splice: socket -> pipe -> socket with ``os.splice``, so payload never enters user space. Pipes come from
  a small pool only while bytes are in flight, so idle flows hold no pipes.
- copy: ``recv_into`` one process-wide buffer, then ``send``; only bytes the peer could not take yet are
  kept per flow (backpressure), so nothing is allocated per chunk on the fast path.

Both paths propagate half-close (EOF -> ``shutdown(SHUT_WR)``) and resets (an error on one side closes the
other with RST), count bytes, and close the flow after ``idle_timeout`` seconds without a byte moving.
No task per direction: a readable/writable callback does the work, which keeps per-flow cost small.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from typing import Protocol

__all__ = ["PIPE_POOL", "Deadlines", "PipePool", "Relay", "can_splice"]

F_SETPIPE_SZ = 1031  # fcntl.h; not exported by Python 3.11's fcntl module
# 1 MiB is the default /proc/sys/fs/pipe-max-size: one splice moves up to this much per call.
PIPE_SIZE = 1 << 20
# Bytes moved per callback before yielding to other flows (fairness), and per syscall on the copy path.
SPLICE_CHUNK = PIPE_SIZE
COPY_BUFFER_SIZE = 256 * 1024
# "auto" relays copy (cheapest for the small exchanges most connections are) until one read returns this
# much, which says the flow is bulk; that direction then moves to splice (as HAProxy's splice-auto).
SPLICE_AUTO_THRESHOLD = 16 * 1024
# Keep at most this many idle pipe pairs (2 fds each) for reuse; more are closed when returned.
POOL_MAX_IDLE = 64

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Errors that mean "this peer is gone" rather than a bug in us.
_PEER_ERRORS = (ConnectionError, TimeoutError)
_LINGER_RST = struct.pack("ii", 1, 0)


class Deadlines(Protocol):
    """Who watches relays' idle deadlines: a coarse timer shared by many flows (gate.deadlines.Sweeper),
    so a relay costs no loop timer of its own. It calls ``relay.expire()`` once ``relay.deadline()``
    passed."""

    def add(self, item: Relay) -> None: ...

    def discard(self, item: Relay) -> None: ...


class PipePool:
    """Reusable non-blocking pipes, enlarged once; a pipe is returned only when empty."""

    def __init__(self, max_idle: int = POOL_MAX_IDLE, size: int = PIPE_SIZE) -> None:
        self._idle: list[tuple[int, int]] = []
        self._max_idle = max_idle
        self._size = size

    def acquire(self) -> tuple[int, int]:
        if self._idle:
            return self._idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self._size)
        except OSError:
            pass  # stays at the default 64 KiB (e.g. pipe-max-size lowered, or per-user pipe quota hit)
        return r, w

    def release(self, pipe: tuple[int, int]) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])

    def clear(self) -> None:
        while self._idle:
            self.discard(self._idle.pop())


PIPE_POOL = PipePool()
_COPY_BUFFER = bytearray(COPY_BUFFER_SIZE)
_COPY_VIEW = memoryview(_COPY_BUFFER)


# socket.socket's family/type properties build enum members on every access, which showed per flow;
# the C base class holds the same values as plain ints.
_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__
_TCP_FAMILIES = (socket.AF_INET.value, socket.AF_INET6.value)


def can_splice(a: socket.socket, b: socket.socket) -> bool:
    """Both ends are kernel stream sockets, so splice(2) can move bytes between them via a pipe."""
    return (_raw_type(a) & 0xF == _raw_type(b) & 0xF == socket.SOCK_STREAM.value
            and _raw_family(a) in _TCP_FAMILIES and _raw_family(b) in _TCP_FAMILIES)


class _Pump:
    """One direction: read ``src``, write ``dst``; pauses reading while ``dst`` is full."""

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, src_name: str, dst_name: str):
        self.relay = relay
        self.loop = relay.loop
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.src_name = src_name
        self.dst_name = dst_name
        self.count = 0
        self.reading = False
        self.writing = False
        self.eof = False

    def start(self) -> None:
        self.loop.add_reader(self.src_fd, self.on_readable)
        self.reading = True

    def on_readable(self) -> None:
        raise NotImplementedError

    def on_writable(self) -> None:
        raise NotImplementedError

    def _wait_writable(self) -> None:
        """``dst`` is full: stop reading ``src`` until it drains (this is the backpressure)."""
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False
        if not self.writing:
            self.loop.add_writer(self.dst_fd, self.on_writable)
            self.writing = True

    def _resume_reading(self) -> None:
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False
        if not self.reading and not self.eof:
            self.loop.add_reader(self.src_fd, self.on_readable)
            self.reading = True

    def _got_eof(self) -> None:
        """``src`` finished sending: pass the half-close on and stop watching it."""
        self.eof = True
        self.stop()
        if not self.relay.pump_finished():  # when both are done, close() sends the FIN anyway
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # dst already gone; its own pump reports that

    def stop(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False


class _SplicePump(_Pump):
    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, src_name: str, dst_name: str):
        super().__init__(relay, src, dst, src_name, dst_name)
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0  # bytes read into the pipe and not yet written out

    def on_readable(self) -> None:
        pipe = self.pipe or PIPE_POOL.acquire()
        self.pipe = pipe
        try:
            n = os.splice(self.src_fd, pipe[1], SPLICE_CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            self._return_pipe()
            return
        except OSError as e:
            self.relay.fail(self.src_name, e)
            return
        if n == 0:
            self._return_pipe()
            self._got_eof()
            return
        self.count += n
        self.in_pipe = n
        self.relay.last_active = self.loop.time()
        self._flush()

    def on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        assert self.pipe is not None  # invariant: bytes in flight live in our pipe
        while self.in_pipe:
            try:
                self.in_pipe -= os.splice(self.pipe[0], self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self._wait_writable()
                return
            except OSError as e:
                self.relay.fail(self.dst_name, e)
                return
        self._return_pipe()
        self._resume_reading()

    def _return_pipe(self) -> None:
        if self.pipe is not None and not self.in_pipe:
            PIPE_POOL.release(self.pipe)
            self.pipe = None

    def stop(self) -> None:
        super().stop()
        if self.pipe is not None:
            if self.in_pipe:
                PIPE_POOL.discard(self.pipe)  # holds bytes nobody will read
            else:
                PIPE_POOL.release(self.pipe)
            self.pipe = None
            self.in_pipe = 0


class _CopyPump(_Pump):
    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, src_name: str, dst_name: str):
        super().__init__(relay, src, dst, src_name, dst_name)
        self.pending = b""  # what dst could not take yet; empty unless backpressured
        self.may_upgrade = False  # "auto": switch to splice once the flow shows it is bulk

    def on_readable(self) -> None:
        try:
            n = self.src.recv_into(_COPY_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.relay.fail(self.src_name, e)
            return
        if n == 0:
            self._got_eof()
            return
        self.count += n
        self.relay.last_active = self.loop.time()
        if self.relay.transform is not None:
            self._send_transformed(bytes(_COPY_VIEW[:n]))
            return
        try:
            sent = self.dst.send(_COPY_VIEW[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self.relay.fail(self.dst_name, e)
            return
        if sent < n:
            self.pending = bytes(_COPY_VIEW[sent:n])
            self._wait_writable()
        elif n >= SPLICE_AUTO_THRESHOLD and self.may_upgrade:
            self.relay.upgrade(self)

    def _send_transformed(self, chunk: bytes) -> None:
        """The relay's transform (an interceptor) decides what goes on: the chunk, other bytes, or
        nothing; if it raises, the flow is reset (``intercept ...`` is the close reason)."""
        assert self.relay.transform is not None
        try:
            out = self.relay.transform("up" if self.src_name == "client" else "down", chunk)
        except Exception as e:
            self.relay.abort(f"intercept {type(e).__name__}: {e}")
            return
        if not out:
            return
        try:
            sent = self.dst.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self.relay.fail(self.dst_name, e)
            return
        if sent < len(out):
            self.pending = out[sent:]
            self._wait_writable()

    def on_writable(self) -> None:
        try:
            sent = self.dst.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.relay.fail(self.dst_name, e)
            return
        self.pending = self.pending[sent:]
        if not self.pending:
            self._resume_reading()


class Relay:
    """Relay between a client and an upstream socket until both directions end, one fails, or idle.

    ``on_done(relay)`` is called exactly once, after both sockets are closed; ``close_reason`` then says
    why ("eof", "client reset", "upstream reset", "idle timeout", or what ``abort`` was given).
    """

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        mode: str,
        idle_timeout: float,
        on_done: Callable[[Relay], None],
        loop: asyncio.AbstractEventLoop | None = None,
        sweeper: Deadlines,
        transform: Callable[[str, bytes], bytes] | None = None,
    ) -> None:
        """``transform(direction, chunk)``: what to send for each chunk read ("up": from the client);
        with one, both directions copy (the bytes must reach Python)."""
        self.loop = loop or asyncio.get_running_loop()
        self.client = client
        self.upstream = upstream
        self.transform = transform
        splice = mode != "copy" and transform is None and can_splice(client, upstream)
        pump: type[_SplicePump | _CopyPump] = _SplicePump if splice and mode == "splice" else _CopyPump
        self.up: _SplicePump | _CopyPump = pump(self, client, upstream, "client", "upstream")
        self.down: _SplicePump | _CopyPump = pump(self, upstream, client, "upstream", "client")
        if splice and mode == "auto":
            self.up.may_upgrade = self.down.may_upgrade = True  # type: ignore[union-attr]
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        self.last_active = self.loop.time()
        self.close_reason = "open"
        self._sweeper = sweeper  # watches the idle deadline, shared with other flows
        self._closed = False

    @property
    def path(self) -> str:
        """"splice" once any direction spliced, else "copy"."""
        return "splice" if isinstance(self.up, _SplicePump) or isinstance(self.down, _SplicePump) else "copy"

    def upgrade(self, pump: _CopyPump) -> None:
        """Move one direction of an "auto" relay from copy to splice (nothing is in flight)."""
        spliced = _SplicePump(self, pump.src, pump.dst, pump.src_name, pump.dst_name)
        spliced.count, spliced.reading = pump.count, pump.reading
        if pump is self.up:
            self.up = spliced
        else:
            self.down = spliced
        self.loop.add_reader(spliced.src_fd, spliced.on_readable)  # replaces the copy pump's callback
        spliced.reading = True

    @property
    def bytes_up(self) -> int:
        return self.up.count

    @property
    def bytes_down(self) -> int:
        return self.down.count

    def start(self) -> None:
        """Begin relaying; both sockets must already be non-blocking (the listener made them so)."""
        self.up.start()
        self.down.start()
        self._sweeper.add(self)

    def deadline(self) -> float:
        return self.last_active + self.idle_timeout

    def expire(self) -> None:
        self.abort("idle timeout")

    def pump_finished(self) -> bool:
        """A direction reached EOF; True if that ended the flow (both directions done)."""
        if self.up.eof and self.down.eof:
            self._close("eof", rst=False)
            return True
        return False

    def fail(self, side: str, error: OSError) -> None:
        """``side`` broke (reset, timeout, ...): pass a reset on to the other side too."""
        what = "reset" if isinstance(error, _PEER_ERRORS) or error.errno == errno.EPIPE else (
            errno.errorcode.get(error.errno or 0, str(error))
        )
        self._close(f"{side} {what}", rst=True)

    def abort(self, reason: str) -> None:
        """End the flow now (idle, gateway shutdown): both sides get a reset, as a dead relay would give."""
        self._close(reason, rst=True)

    def _close(self, reason: str, *, rst: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        self._sweeper.discard(self)
        self.up.stop()
        self.down.stop()
        for s in (self.client, self.upstream):
            if rst:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            s.close()
        self.on_done(self)
        # Break the relay <-> pump reference cycles so the flow is freed at once, not by the cycle
        # collector (whose runs grow with the number of flows alive).
        self.up.relay = self.down.relay = None  # type: ignore[assignment]
