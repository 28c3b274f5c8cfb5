"""Listening sockets a gate did not bind itself: from systemd (socket activation), from the gate it
replaces (HAProxy's ``-x``: SCM_RIGHTS over a unix socket), or from its own listener that a reload rebuilt.

Every TCP listener asks ``LISTENING.take(address)`` before it binds, so a socket that already listens on
the address is reused as it is: connections queued in its backlog are neither refused nor reset, which a
close followed by a new bind cannot promise.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import stat
from collections.abc import Mapping

from gate.addr import Endpoint

__all__ = ["LISTENING", "SD_LISTEN_FDS_START", "Pool", "from_systemd", "receive", "send"]

log = logging.getLogger("ugate")

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here
# A successor's request and our answer are one short line each; a peer that sends more is not ugate.
HANDOFF_LINE_MAX = 65536
MAX_FDS = 1024  # descriptors accepted in one handoff: far above any config's listeners, far below ulimit -n


def _key(host: str, port: int) -> tuple[str, int]:
    """The same address however it is written (``::`` and ``0:0::0``, ``[::1]``)."""
    host = host.strip("[]")
    try:
        host = str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        pass
    return host, port


def _key_of(sock: socket.socket) -> tuple[str, int] | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if not isinstance(name, tuple):
        return None  # a unix socket: no listener of ours has one
    return _key(str(name[0]), int(name[1]))


def _listening_stream(sock: socket.socket) -> bool:
    return (sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
            and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)))


class Pool:
    """Listening TCP sockets by local address, waiting for the listener that serves that address."""

    def __init__(self) -> None:
        self._sockets: dict[tuple[str, int], socket.socket] = {}

    def put(self, sock: socket.socket) -> bool:
        """Keep ``sock`` for its address; False (and the socket untouched) if it is not a listening TCP
        socket with an IP address, or its address already has one."""
        key = _key_of(sock)
        if key is None or key in self._sockets or not _listening_stream(sock):
            return False
        sock.setblocking(False)
        os.set_inheritable(sock.fileno(), False)
        self._sockets[key] = sock
        return True

    def take(self, at: Endpoint) -> socket.socket | None:
        return self._sockets.pop(_key(at.host, at.port), None)

    def discard(self, sock: socket.socket) -> None:
        """Forget and close ``sock`` (bound for a reload that was then refused)."""
        for key, held in list(self._sockets.items()):
            if held is sock:
                del self._sockets[key]
        sock.close()

    def __contains__(self, at: Endpoint) -> bool:
        return _key(at.host, at.port) in self._sockets

    def __len__(self) -> int:
        return len(self._sockets)

    def close_unclaimed(self) -> list[str]:
        """Close what no listener took (a socket unit with an address the config no longer has)."""
        left = [f"{host}:{port}" for host, port in self._sockets]
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        return left


LISTENING = Pool()  # the process's one pool (gate.accept takes from it)


def from_systemd(pool: Pool, env: Mapping[str, str] | None = None, pid: int | None = None) -> int:
    """Adopt the sockets systemd passed (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES), matched to listeners by
    address, not by name or order, so the .socket unit and the config need not list them alike.

    The variables are removed from the environment (sd_listen_fds(1)), so programs we run do not think the
    sockets are theirs. Returns how many sockets were adopted."""
    environ = os.environ if env is None else env
    if environ.get("LISTEN_PID", "") != str(os.getpid() if pid is None else pid):
        return 0
    count = environ.get("LISTEN_FDS", "")
    if not count.isdigit():
        return 0
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    if env is None:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    adopted = 0
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + min(int(count), MAX_FDS))):
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            log.warning("socket activation: descriptor %d is not a socket; ignored", fd)
            continue
        sock = socket.socket(fileno=fd)
        if pool.put(sock):
            adopted += 1
        else:
            name = names[i] if i < len(names) else str(fd)
            log.warning("socket activation: %s is not a listening TCP socket with an address; ignored", name)
            sock.close()
    return adopted


def send(conn: socket.socket, sockets: list[socket.socket]) -> None:
    """Pass ``sockets`` over the unix stream ``conn``: one line of JSON naming their addresses, the
    descriptors riding along it (SCM_RIGHTS)."""
    names = [f"{k[0]}:{k[1]}" for s in sockets if (k := _key_of(s)) is not None]
    socket.send_fds(conn, [json.dumps({"listening": names}).encode() + b"\n"], [s.fileno() for s in sockets])


def receive(conn: socket.socket, pool: Pool) -> int:
    """Read what ``send`` sent into ``pool``; returns how many sockets were adopted."""
    data, fds, _flags, _addr = socket.recv_fds(conn, HANDOFF_LINE_MAX, MAX_FDS)
    if not data.endswith(b"\n"):
        for fd in fds:
            os.close(fd)
        raise OSError("handoff: the old gate's answer is cut short")
    adopted = 0
    for fd in fds:
        sock = socket.socket(fileno=fd)
        if pool.put(sock):
            adopted += 1
        else:
            sock.close()
    return adopted
