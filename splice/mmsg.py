"""Batched datagram relaying with recvmmsg(2)/sendmmsg(2), which Python's socket module lacks.

A UDP relay in Python spends most of each datagram on two syscalls and their wrappers. A batch moves
up to ``count`` datagrams per syscall pair, from preallocated buffers that are never copied into
Python objects: what ``recv`` filled is what ``send`` sends. Used on the hot path of long UDP flows.

With ``segments=True`` the batch also carries UDP generic receive/segmentation offload: a socket with
UDP_GRO set (see ``enable_gro``) may hand over several datagrams of one flow coalesced into one buffer,
with their segment size in a control message; ``send`` passes that size back as UDP_SEGMENT, so the kernel
splits the buffer into exactly the datagrams that arrived. One syscall and one trip through routing and
netfilter then moves up to 64 datagrams (when the receiving interface does GRO: real NICs by default,
veth once ``ethtool -K <veth> gro on`` gives it NAPI).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct

__all__ = ["DatagramBatch", "available", "enable_gro", "sockaddr"]

MSG_DONTWAIT = 0x40
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104  # linux/udp.h
_CMSG_HEADER = struct.Struct("=QiiH")  # struct cmsghdr (len, level, type) followed by a u16 segment size
_CONTROL_SPACE = 24  # CMSG_SPACE(sizeof(int)): the UDP_GRO message on receive, UDP_SEGMENT's u16 on send


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


def enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced datagrams on ``sock`` (read it only through a ``segments=True`` batch, which
    knows their segment size); False where the kernel lacks UDP_GRO (before 5.0)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class DatagramBatch:
    """``count`` buffers of ``size`` bytes and their mmsghdr array, reused for every batch."""

    def __init__(self, count: int = 64, size: int = 65535, segments: bool = False) -> None:
        self.count = count
        self.segments = segments
        self._control = (ctypes.c_char * (_CONTROL_SPACE * count))() if segments else None
        self._gso = [0] * count  # segment size of each received buffer, 0 when it holds one datagram
        self._buffers = (ctypes.c_char * (size * count))()
        base = ctypes.addressof(self._buffers)
        self._iov = (_IOVec * count)()
        self._msgs = (_MMsgHdr * count)()
        self._name = ctypes.create_string_buffer(28)  # the kernel writes sources here; send puts dest here
        control = ctypes.addressof(self._control) if self._control is not None else None
        for i in range(count):
            self._iov[i].iov_base = base + i * size
            self._iov[i].iov_len = size
            hdr = self._msgs[i].msg_hdr
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1
            hdr.msg_name = ctypes.addressof(self._name)
            hdr.msg_namelen = len(self._name)
            if control is not None:
                hdr.msg_control = control + i * _CONTROL_SPACE
                hdr.msg_controllen = _CONTROL_SPACE
        # recv restores these with two memmoves instead of a Python loop over every header (the loop was
        # a large part of a batch's cost; the kernel and send rewrite lengths in place)
        self._msgs_for_recv = bytes(self._msgs)
        self._iov_for_recv = bytes(self._iov)

    def recv(self, fd: int) -> int:
        """Fill up to ``count`` datagrams from ``fd``; 0 when nothing is waiting."""
        assert _LIBC is not None
        ctypes.memmove(self._msgs, self._msgs_for_recv, len(self._msgs_for_recv))
        ctypes.memmove(self._iov, self._iov_for_recv, len(self._iov_for_recv))
        got = _LIBC.recvmmsg(fd, self._msgs, self.count, MSG_DONTWAIT, None)
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        if self._control is not None:
            self._read_segment_sizes(int(got))
        return int(got)

    def _read_segment_sizes(self, n: int) -> None:
        """The UDP_GRO control message, when the kernel put one (coalesced datagrams) in a buffer."""
        assert self._control is not None
        raw = memoryview(self._control).cast("B")
        for i in range(n):
            self._gso[i] = 0
            if self._msgs[i].msg_hdr.msg_controllen >= _CMSG_HEADER.size:
                _, level, kind, size = _CMSG_HEADER.unpack_from(raw, i * _CONTROL_SPACE)
                if level == SOL_UDP and kind == UDP_GRO:
                    self._gso[i] = size

    def datagrams(self, n: int) -> int:
        """How many datagrams the first ``n`` buffers hold (more than ``n`` when some were coalesced)."""
        if not self.segments:
            return n
        total = 0
        for i in range(n):
            gso = self._gso[i]
            total += -(-self._msgs[i].msg_len // gso) if gso else 1
        return total

    def size(self, n: int) -> int:
        """Bytes in the first ``n`` datagrams."""
        return sum(self._msgs[i].msg_len for i in range(n))

    def send(self, fd: int, n: int, dest: bytes | None = None) -> int:
        """Send the ``n`` datagrams ``recv`` filled (to ``dest``, a sockaddr, or the connected peer);
        returns how many the kernel took (the rest are dropped, as a router would)."""
        assert _LIBC is not None
        if dest is not None:
            ctypes.memmove(self._name, dest, len(dest))
        namelen = len(dest) if dest is not None else 0
        control = self._control
        for i in range(n):
            msg = self._msgs[i]
            length = msg.msg_len
            self._iov[i].iov_len = length
            hdr = msg.msg_hdr
            hdr.msg_namelen = namelen
            if dest is None:
                hdr.msg_name = None
            if control is not None:
                gso = self._gso[i]
                if gso and length > gso:  # coalesced: the kernel splits it again every gso bytes
                    _CMSG_HEADER.pack_into(control, i * _CONTROL_SPACE, _CMSG_HEADER.size, SOL_UDP,
                                           UDP_SEGMENT, gso)
                    hdr.msg_controllen = _CONTROL_SPACE
                else:
                    hdr.msg_controllen = 0
        sent = _LIBC.sendmmsg(fd, self._msgs, n, MSG_DONTWAIT)
        if sent < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        return int(sent)
