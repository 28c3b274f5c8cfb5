"""With ``workers: N``, one admin request answers for every worker: each worker also serves its own
numbers on a private unix socket in a directory of the run, and whichever worker the kernel gave the
request to asks its siblings there and combines the answers.

Why not prometheus-client's multiprocess mode: it would sum the metrics (through a memory-mapped file
per worker, written on every increment) but not list or cut another worker's flows, which the admin API
needs anyway; asking siblings at request time does both, and the hot path keeps plain dict increments.
What a worker that died had counted is lost with it (its counters restart with its replacement, which
Prometheus' rate() reads as a counter reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import tempfile
from typing import Any

from gate.admin.http import BadRequest, fetch

__all__ = ["SIBLING_TIMEOUT", "Siblings", "bind_unix", "unlink_if_ours"]

# A sibling that does not answer within this is left out of the answer (it may be busy or dying);
# Prometheus' default scrape timeout is 10 s.
SIBLING_TIMEOUT = 2.0


def bind_unix(path: str) -> tuple[socket.socket, int]:
    """A listening unix socket at ``path``, mode 0600, put in place atomically (bound under a temporary
    name, then renamed over ``path``): when several workers bind the same path, the last one holds it,
    and a client never finds the path missing or refusing. Returns the socket and its file's inode."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temporary = f"{path}.{os.getpid()}.new"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        inode = os.stat(temporary).st_ino  # (a rename keeps it)
        os.rename(temporary, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return sock, inode


def unlink_if_ours(path: str, inode: int) -> None:
    """Remove ``path`` if it is still the socket we bound (a sibling may have renamed its own over it)."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def _private_dir(supervisor: int) -> str:
    """The run's directory of worker sockets: ours alone (0700, owned by us), or OSError."""
    path = os.path.join(tempfile.gettempdir(), f"ugate-{supervisor}.admin")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} is not a private directory of ours: workers answer only for themselves")
    return path


class Siblings:
    """This worker's private socket, and the way to ask the other workers of the run."""

    def __init__(self, supervisor: int) -> None:
        self.dir = _private_dir(supervisor)
        self.pid = os.getpid()
        self.path = os.path.join(self.dir, f"{self.pid}.sock")
        self.sock, self._inode = bind_unix(self.path)

    def others(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return [os.path.join(self.dir, n) for n in sorted(names) if n.endswith(".sock") and n != f"{self.pid}.sock"]

    def path_of(self, pid: int) -> str:
        return os.path.join(self.dir, f"{pid}.sock")

    async def ask(self, method: str, target: str, paths: list[str] | None = None) -> list[tuple[int, Any]]:
        """(status, decoded JSON) of each sibling that answered; those that did not are left out, and the
        sockets of workers that are gone are removed."""
        paths = self.others() if paths is None else paths
        answers = await asyncio.gather(*(fetch(p, method, target, SIBLING_TIMEOUT) for p in paths),
                                       return_exceptions=True)
        out = []
        for path, answer in zip(paths, answers, strict=True):
            if isinstance(answer, ConnectionRefusedError | FileNotFoundError):
                with contextlib.suppress(OSError):
                    os.unlink(path)  # a worker killed before it could remove its socket
                continue
            if isinstance(answer, BaseException):
                if not isinstance(answer, OSError | TimeoutError | BadRequest):
                    raise answer
                continue
            status, body = answer
            try:
                out.append((status, json.loads(body)))
            except ValueError:
                continue
        return out

    def close(self) -> None:
        unlink_if_ours(self.path, self._inode)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)  # the last worker out removes the directory
