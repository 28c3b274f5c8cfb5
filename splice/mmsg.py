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

``send(..., coalesce=True)`` does the same for datagrams that arrived one by one: consecutive datagrams of
one size (the last of a run may be shorter) leave as one UDP_SEGMENT send whose iovec points at their
buffers in place, so a burst of a client's equal-sized datagrams (a bulk transfer, a QUIC flight, a
VPN's packets) takes one trip through routing, netfilter and conntrack instead of one each. Receivers see
exactly the datagrams that arrived: the kernel (or the NIC) cuts the run at every segment size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct

__all__ = ["DatagramBatch", "address", "available", "enable_gro", "sockaddr"]

MSG_DONTWAIT = 0x40
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104  # linux/udp.h
_CMSG_HEADER = struct.Struct("=QiiH")  # struct cmsghdr (len, level, type) followed by a u16 segment size
_CONTROL_SPACE = 24  # CMSG_SPACE(sizeof(int)): the UDP_GRO message on receive, UDP_SEGMENT's u16 on send
# One UDP_SEGMENT send: the kernel refuses more than UDP_MAX_SEGMENTS (64 before Linux 6.9, 128 since) and
# a payload over the IP datagram limit (65,507 bytes for UDP over IPv4)
MAX_RUN_SEGMENTS = 64
MAX_RUN_BYTES = 65000
_SOCKADDR_SPACE = 28  # sizeof(struct sockaddr_in6), the larger of the two
# what a send of a coalesced run fails with where the path cannot take it (a segment over the route's
# MTU, a device or xfrm path without UDP GSO): the datagrams are sent again one by one
_GSO_REFUSED = (errno.EINVAL, errno.EMSGSIZE, errno.EIO)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),  # struct iovec *: an address, so send can point into the array
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
        # the header array is passed as an address: send starts part-way into it
        libc.recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
        libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
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


def address(raw: bytes) -> tuple[str, int]:
    """(host, port) of a struct sockaddr_in / sockaddr_in6, as recvfrom would give it (IPv4-mapped
    IPv6 addresses as they are)."""
    (family,) = struct.unpack_from("=H", raw)
    (port,) = struct.unpack_from("!H", raw, 2)
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


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

    def __init__(self, count: int = 64, size: int = 65535, segments: bool = False, sources: bool = False) -> None:
        """``sources``: keep each datagram's source address (``source(i)``), for an unconnected socket
        whose datagrams come from several remotes; otherwise they share one, unread, name buffer."""
        self.count = count
        self.segments = segments
        self._control = (ctypes.c_char * (_CONTROL_SPACE * count))() if segments else None
        self._gso = [0] * count  # segment size of each received buffer, 0 when it holds one datagram
        self._buffers = (ctypes.c_char * (size * count))()
        base = ctypes.addressof(self._buffers)
        self._iov = (_IOVec * count)()
        self._iov_base = ctypes.addressof(self._iov)
        self._msgs = (_MMsgHdr * count)()
        self._msgs_address = ctypes.addressof(self._msgs)
        self._lengths: list[int] = []  # of the datagrams recv filled (send rewrites headers, msg_len too)
        self.gso_refused = False  # the last send had to undo its coalescing: the path cannot take it
        self._name = ctypes.create_string_buffer(28)  # the kernel writes sources here; send puts dest here
        self._sources = ctypes.create_string_buffer(_SOCKADDR_SPACE * count) if sources else None
        control = ctypes.addressof(self._control) if self._control is not None else None
        for i in range(count):
            self._iov[i].iov_base = base + i * size
            self._iov[i].iov_len = size
            hdr = self._msgs[i].msg_hdr
            hdr.msg_iov = self._iov_base + i * ctypes.sizeof(_IOVec)
            hdr.msg_iovlen = 1
            if self._sources is not None:
                hdr.msg_name = ctypes.addressof(self._sources) + i * _SOCKADDR_SPACE
                hdr.msg_namelen = _SOCKADDR_SPACE
            else:
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
        got = _LIBC.recvmmsg(fd, self._msgs_address, self.count, MSG_DONTWAIT, None)
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        msgs = self._msgs
        self._lengths = [msgs[i].msg_len for i in range(got)]
        if self._control is not None:
            self._read_segment_sizes(int(got))
        return int(got)

    def source(self, i: int) -> bytes:
        """The raw sockaddr datagram ``i`` came from (a batch made with ``sources=True``): compared and
        used as a cache key as is; ``address`` turns it into (host, port)."""
        assert self._sources is not None
        return self._sources.raw[i * _SOCKADDR_SPACE:i * _SOCKADDR_SPACE + self._msgs[i].msg_hdr.msg_namelen]

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
            total += -(-self._lengths[i] // gso) if gso else 1
        return total

    def size(self, n: int, start: int = 0) -> int:
        """Bytes in datagrams ``start`` to ``n``."""
        return sum(self._lengths[start:n])

    def send(self, fd: int, n: int, dest: bytes | None = None, coalesce: bool = False, start: int = 0) -> int:
        """Send the ``n`` datagrams ``recv`` filled (to ``dest``, a sockaddr, or the connected peer);
        returns how many the kernel took (the rest are dropped, as a router would). With ``coalesce``,
        runs of equal-sized datagrams leave as one segmented send each (see the module docstring); where
        the path refuses that, they are sent again one by one and ``gso_refused`` says so. ``start``: send
        datagrams ``start`` to ``n`` only (a batch from several remotes goes to several sockets)."""
        assert _LIBC is not None
        if dest is not None:
            ctypes.memmove(self._name, dest, len(dest))
        self.gso_refused = False
        ends = self._headers(start, n, dest, coalesce)
        sent = self._sendmmsg(fd, start, len(ends))
        if sent < 0 and coalesce and -sent in _GSO_REFUSED and len(ends) < n - start:
            self.gso_refused = True
            sent = self._sendmmsg(fd, start, len(self._headers(start, n, dest, False)))
            return max(sent, 0)
        return ends[sent - 1] - start if sent > 0 else 0

    def _sendmmsg(self, fd: int, start: int, count: int) -> int:
        """sendmmsg of headers ``start``.. ``start + count``: how many went, or -errno for a refusal
        (a full buffer is 0: those datagrams are dropped, as a router would)."""
        assert _LIBC is not None
        sent = _LIBC.sendmmsg(fd, self._msgs_address + start * ctypes.sizeof(_MMsgHdr), count, MSG_DONTWAIT)
        if sent >= 0:
            return int(sent)
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            return 0
        if err in _GSO_REFUSED:
            return -err
        raise OSError(err, os.strerror(err))

    def _headers(self, start: int, n: int, dest: bytes | None, coalesce: bool) -> list[int]:
        """Write one send header per run of datagrams ``start``..``n`` (one datagram per run unless
        ``coalesce``), from header ``start`` on; returns the end index of each run. Header start + k is
        written after every length is read, and is <= the run's first index, so nothing still needed is
        overwritten; recv restores the receive headers."""
        lengths, msgs, control, gso_of = self._lengths, self._msgs, self._control, self._gso
        namelen = len(dest) if dest is not None else 0
        name = ctypes.addressof(self._name) if dest is not None else None
        iov_size = ctypes.sizeof(_IOVec)
        ends: list[int] = []
        i = start
        while i < n:
            length = lengths[i]
            gso = gso_of[i] if control is not None else 0
            seg = gso or length
            total, segments = length, (-(-length // gso) if gso else 1)
            j = i + 1
            if coalesce and seg and length % seg == 0:  # a run may go on after this datagram
                while j < n:
                    more = lengths[j]
                    more_gso = gso_of[j] if control is not None else 0
                    more_segments = -(-more // more_gso) if more_gso else 1
                    if (not more or (more_gso or more) > seg or (more_gso and more_gso != seg)
                            or total + more > MAX_RUN_BYTES or segments + more_segments > MAX_RUN_SEGMENTS):
                        break
                    total += more
                    segments += more_segments
                    j += 1
                    if more % seg:  # a shorter last segment ends the run
                        break
            for k in range(i, j):
                self._iov[k].iov_len = lengths[k]
            slot = start + len(ends)
            hdr = msgs[slot].msg_hdr
            hdr.msg_iov = self._iov_base + i * iov_size
            hdr.msg_iovlen = j - i
            hdr.msg_name = name
            hdr.msg_namelen = namelen
            if control is not None:
                at = slot * _CONTROL_SPACE
                hdr.msg_control = ctypes.addressof(control) + at
                if total > seg:  # more than one datagram: the kernel splits it again every seg bytes
                    _CMSG_HEADER.pack_into(control, at, _CMSG_HEADER.size, SOL_UDP, UDP_SEGMENT, seg)
                    hdr.msg_controllen = _CONTROL_SPACE
                else:
                    hdr.msg_controllen = 0
            ends.append(j)
            i = j
        return ends
