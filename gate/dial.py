"""Opening upstream TCP connections, with the failure said in our error vocabulary.

``Connect`` is one non-blocking connect driven by a writability callback; ``open_tcp`` wraps it for
coroutines (resolving names, trying each address). Not ``loop.sock_connect``: uvloop's sends every
address through getaddrinfo on its thread pool, a thread wake-up per flow even for IP literals.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from gate.addr import Endpoint, is_ip
from gate.deadlines import Sweeper
from gate.errors import UpstreamError, UpstreamRefused, UpstreamTimeout, UpstreamUnreachable
from gate.metrics import DIAL_ERRORS
from tproxy.sockopts import set_mark, set_transparent
from tproxy.tuples import bind_apart

__all__ = ["Connect", "SocketOptions", "literal_family", "open_tcp", "resolve"]


@functools.lru_cache(maxsize=4096)
def literal_family(host: str) -> int | None:
    """AF_INET/AF_INET6 when ``host`` is an address literal, else None (cached: asked once per flow)."""
    return (socket.AF_INET6 if ":" in host else socket.AF_INET) if is_ip(host) else None


def upstream_error(dst: Endpoint, err: int) -> UpstreamError:
    if err == errno.ECONNREFUSED:
        return UpstreamRefused(f"{dst}: connection refused")
    if err == errno.ETIMEDOUT:
        return UpstreamTimeout(f"{dst}: connect timed out")
    return UpstreamUnreachable(f"{dst}: {errno.errorcode.get(err, os.strerror(err))}")


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """How an upstream socket is set up before connecting."""

    mark: int | None = None  # SO_MARK, so capture rules skip ugate's own traffic
    source: tuple[str, int] | None = None  # leave from the client's address (IP_TRANSPARENT bind)
    # An app in this namespace (ingress): the source port is chosen so that no socket here already has
    # the tuple the app's socket will get (see tproxy.tuples); ``source``'s port is then not used.
    apart_from: tuple[str, int] | None = None

    def apply(self, sock: socket.socket) -> None:
        if self.mark is not None:
            set_mark(sock, self.mark)
        if self.source is not None:
            set_transparent(sock)
            if self.apart_from is not None:
                bind_apart(sock, self.source[0], self.apart_from)
                return
            try:
                sock.bind(self.source)  # the client's port too, where it is free here
            except OSError:
                sock.bind((self.source[0], 0))


class Connect:
    """Connect to one address; ``on_done(sock, None)`` or ``on_done(None, error)`` is called once.

    On success ``on_done`` runs while the socket is still registered for writing and the registration
    is dropped only afterwards, so a relay that starts reading in ``on_done`` reuses the event loop's
    poll handle instead of closing and re-creating it. With a ``sweeper`` the connect timeout is
    checked by that shared coarse timer instead of a loop timer of its own.
    """

    __slots__ = ("_deadline", "_fd", "_loop", "_on_done", "_registered", "_sweeper", "_timeout", "_timer", "dst",
                 "sock")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        dst: Endpoint,
        family: int,
        timeout: float,
        on_done: Callable[[socket.socket | None, UpstreamError | None], None],
        sweeper: Sweeper | None = None,
        opts: SocketOptions | None = None,
    ) -> None:
        self._loop = loop
        self._on_done: Callable[[socket.socket | None, UpstreamError | None], None] | None = on_done
        self._sweeper = sweeper
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = timeout
        self._deadline = loop.time() + timeout
        self.dst = dst
        # SOCK_NONBLOCK at creation saves the ioctl that setblocking(False) would cost; no Nagle
        # delay, since a relay must not hold back the small writes it forwards
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fd = self.sock.fileno()
        try:
            if opts is not None:
                opts.apply(self.sock)
            err = self.sock.connect_ex((dst.host, dst.port))
        except OSError as e:
            err = e.errno or errno.EINVAL
        self._registered = err in (errno.EINPROGRESS, errno.EAGAIN)
        if not self._registered:
            loop.call_soon(self._finish, err)
            return
        loop.add_writer(self._fd, self._writable)
        if sweeper is not None:
            sweeper.add(self)
        else:
            self._timer = loop.call_later(timeout, self.expire)

    def deadline(self) -> float:
        return self._deadline

    def expire(self) -> None:
        """The connect timeout passed."""
        self._fail(UpstreamTimeout(f"{self.dst}: no answer within {self._timeout:g}s"))

    def _writable(self) -> None:
        self._finish(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def _stop_clock(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sweeper is not None:
            self._sweeper.discard(self)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._loop.remove_writer(self._fd)

    def _finish(self, err: int) -> None:
        if err:
            self._fail(upstream_error(self.dst, err))
            return
        self._stop_clock()
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self.sock, None)
        self._unregister()

    def _fail(self, error: UpstreamError) -> None:
        DIAL_ERRORS[error.kind] += 1
        self._stop_clock()
        self._unregister()
        self.sock.close()
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(None, error)

    def cancel(self) -> None:
        """Give up (shutdown, or the caller's own timeout); ``on_done`` is not called."""
        if self._on_done is None:
            return
        self._on_done = None
        self._stop_clock()
        self._unregister()
        self.sock.close()


async def resolve(dst: Endpoint, timeout: float) -> list[tuple[int, Endpoint]]:
    """``dst``'s addresses with their families (an address literal is its own), within ``timeout``."""
    family = literal_family(dst.host)
    if family is not None:
        return [(family, dst)]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(dst.host, dst.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        DIAL_ERRORS["dns"] += 1
        raise UpstreamUnreachable(f"{dst.host}: {e.strerror}") from None
    except TimeoutError:
        DIAL_ERRORS["dns"] += 1
        raise UpstreamTimeout(f"{dst}: name not resolved within {timeout:g}s") from None
    return [(family, Endpoint(str(addr[0]), int(addr[1]))) for family, _, _, _, addr in infos]


async def open_tcp(dst: Endpoint, timeout: float, opts: SocketOptions | None = None,
                   addresses: list[tuple[int, Endpoint]] | None = None) -> socket.socket:
    """Connect to ``dst`` within ``timeout`` seconds, trying each of its addresses in turn (resolved
    here, or the ``addresses`` the caller resolved and vetted)."""
    loop = asyncio.get_running_loop()
    error: UpstreamError = UpstreamUnreachable(f"{dst}: no address")
    deadline = loop.time() + timeout
    if addresses is None:
        addresses = await resolve(dst, timeout)
    for family, addr in addresses:
        fut: asyncio.Future[socket.socket] = loop.create_future()

        def done(sock: socket.socket | None, err: UpstreamError | None,
                 fut: asyncio.Future[socket.socket] = fut) -> None:
            if fut.done():
                return
            if sock is not None:
                fut.set_result(sock)
            else:
                assert err is not None
                fut.set_exception(err)

        attempt = Connect(loop, addr, family, max(deadline - loop.time(), 0.001), done, opts=opts)
        try:
            return await fut
        except UpstreamError as e:
            error = e if dst == addr else type(e)(str(e).replace(str(addr), f"{dst} ({addr})", 1))
        except BaseException:
            attempt.cancel()
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().close()  # connected just as we were cancelled
            raise
    raise error
