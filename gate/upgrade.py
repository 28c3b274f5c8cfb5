"""Zero-downtime upgrades by passing the listening sockets to a new process (HAProxy's ``-x``).

A gate run with ``--handoff PATH`` serves PATH (a unix stream socket, mode 0600). A new gate started with
the same option finds the old one there before it binds anything: it receives every TCP listening socket
(SCM_RIGHTS), starts its listeners on them, and answers ``ready``; only then does the old gate stop
accepting and drain its open flows, and the new one serves PATH for the next upgrade. The listening
sockets never close, so no connection attempt is refused or reset: both processes accept from the same
queue during the overlap. If the new gate fails before ``ready``, the old one goes on as if nothing
happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from gate.handoff import HANDOFF_LINE_MAX, Pool, receive, send

__all__ = ["READY", "HandoffServer", "confirm", "take_over"]

log = logging.getLogger("ugate")

READY = b"ready\n"
CONNECT_TIMEOUT = 5.0  # seconds for the old gate to answer; a hung one must not keep the new one from starting


def take_over(path: str, pool: Pool) -> socket.socket | None:
    """Before binding: the old gate's listening sockets into ``pool``; returns the connection to answer
    ``ready`` on (None: no gate serves ``path``, so this one starts as a first one would)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        conn.connect(path)
        count = receive(conn, pool)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None  # no gate there (or a stale path from one that was killed)
    except BaseException:
        conn.close()
        raise
    log.info("handoff: took %d listening sockets over from the gate at %s", count, path)
    return conn


def confirm(conn: socket.socket) -> None:
    """Tell the old gate that our listeners run: it stops accepting and drains."""
    with contextlib.suppress(OSError):  # it died meanwhile: nothing to tell
        conn.sendall(READY)
    conn.close()


class HandoffServer:
    """Serves PATH to the gate that will replace this one (see the module docstring)."""

    def __init__(self, path: str, sockets: Callable[[], list[socket.socket]], handed: Callable[[], None]) -> None:
        self.path = path
        self._sockets = sockets  # the listening sockets to pass (asked when a successor connects)
        self._handed = handed  # called once the successor is ready: stop accepting, keep the rules, drain
        self._server: socket.socket | None = None
        self._inode: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a predecessor's (it no longer needs it once we are ready) or a stale one
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_mask = os.umask(0o177)  # only our user may take our sockets
        try:
            server.bind(self.path)
        finally:
            os.umask(old_mask)
        server.listen(4)
        server.setblocking(False)
        self._inode = os.stat(self.path).st_ino
        self._server = server
        asyncio.get_running_loop().add_reader(server.fileno(), self._accept)
        log.info("handoff: a new gate started with --handoff %s takes this one's listening sockets over", self.path)

    def _accept(self) -> None:
        assert self._server is not None
        try:
            conn, _ = self._server.accept()
        except (BlockingIOError, InterruptedError):
            return
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        with conn:
            sockets = self._sockets()
            try:
                send(conn, sockets)
                answer = b""
                while not answer.endswith(b"\n") and len(answer) < HANDOFF_LINE_MAX:
                    chunk = await loop.sock_recv(conn, 64)
                    if not chunk:
                        break
                    answer += chunk
            except OSError as e:
                log.warning("handoff: the new gate went away (%s); this one goes on serving", e)
                return
            if answer != READY:
                log.warning("handoff: the new gate did not start (it closed without ready); this one goes on serving")
                return
        log.info("handoff: the new gate runs on our %d listening sockets; stopping and draining", len(sockets))
        self.close()
        self._handed()

    def close(self) -> None:
        """Stop serving PATH; the file goes only if it is still ours (a successor may have bound its own)."""
        if self._server is None:
            return
        asyncio.get_running_loop().remove_reader(self._server.fileno())
        self._server.close()
        self._server = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
