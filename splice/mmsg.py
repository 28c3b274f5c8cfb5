"""Batched datagram relaying with recvmmsg(2)/sendmmsg(2), which Python's socket module lacks.

A UDP relay in Python spends most of each datagram on two syscalls and their wrappers. A batch moves
up to ``count`` datagrams per syscall pair, from preallocated buffers that are never copied into
Python objects: what ``recv`` filled is what ``send`` sends. Used on the hot path of long UDP flows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct

__all__ = ["DatagramBatch", "available", "sockaddr"]

MSG_DONTWAIT = 0x40


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_IOVec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.recvmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_MMsgHdr), ctypes.c_uint, ctypes.c_int,
                                  ctypes.c_void_p]
        libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_MMsgHdr), ctypes.c_uint, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def available() -> bool:
    return _LIBC is not None


def sockaddr(host: str, port: int) -> bytes:
    """struct sockaddr_in / sockaddr_in6 for ``host``, as sendmmsg wants a destination."""
    if ":" in host:
        return struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + socket.inet_pton(
            socket.AF_INET6, host) + struct.pack("=I", 0)
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)


class DatagramBatch:
    """``count`` buffers of ``size`` bytes and their mmsghdr array, reused for every batch."""

    def __init__(self, count: int = 64, size: int = 65535) -> None:
        self.count = count
        self._buffers = (ctypes.c_char * (size * count))()
        base = ctypes.addressof(self._buffers)
        self._size = size
        self._iov = (_IOVec * count)()
        self._msgs = (_MMsgHdr * count)()
        for i in range(count):
            self._iov[i].iov_base = base + i * size
            self._iov[i].iov_len = size
            self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iov[i])
            self._msgs[i].msg_hdr.msg_iovlen = 1
        self._name = ctypes.create_string_buffer(28)

    def recv(self, fd: int) -> int:
        """Fill up to ``count`` datagrams from ``fd``; 0 when nothing is waiting."""
        assert _LIBC is not None
        for i in range(self.count):
            self._iov[i].iov_len = self._size
            self._msgs[i].msg_hdr.msg_name = None
            self._msgs[i].msg_hdr.msg_namelen = 0
        got = _LIBC.recvmmsg(fd, self._msgs, self.count, MSG_DONTWAIT, None)
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        return int(got)

    def size(self, n: int) -> int:
        """Bytes in the first ``n`` datagrams."""
        return sum(self._msgs[i].msg_len for i in range(n))

    def send(self, fd: int, n: int, dest: bytes | None = None) -> int:
        """Send the ``n`` datagrams ``recv`` filled (to ``dest``, a sockaddr, or the connected peer);
        returns how many the kernel took (the rest are dropped, as a router would)."""
        assert _LIBC is not None
        if dest is not None:
            ctypes.memmove(self._name, dest, len(dest))
        name = ctypes.addressof(self._name) if dest is not None else None
        for i in range(n):
            msg = self._msgs[i]
            self._iov[i].iov_len = msg.msg_len
            msg.msg_hdr.msg_name = name
            msg.msg_hdr.msg_namelen = len(dest) if dest is not None else 0
        sent = _LIBC.sendmmsg(fd, self._msgs, n, MSG_DONTWAIT)
        if sent < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        return int(sent)
