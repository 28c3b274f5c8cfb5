"""The socket options of transparent capture, one tiny documented helper each.

Constants come from linux/in.h, linux/in6.h, linux/netfilter_ipv4.h and asm-generic/socket.h; Python
3.11 exports only some.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

__all__ = [
    "OriginalDstUnavailable",
    "is_local_address",
    "original_dst",
    "parse_origdst",
    "set_big_buffers",
    "set_freebind",
    "set_mark",
    "set_recv_origdst",
    "set_transparent",
    "unmap",
]

IP_TRANSPARENT = 19  # linux/in.h
IPV6_TRANSPARENT = 75  # linux/in6.h
IP_FREEBIND = 15  # linux/in.h
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value at SOL_IPV6
SO_MARK = 36  # asm-generic/socket.h
IP_RECVORIGDSTADDR = 20  # linux/in.h; the cmsg type IP_ORIGDSTADDR has the same value
IPV6_RECVORIGDSTADDR = 74  # linux/in6.h; likewise IPV6_ORIGDSTADDR
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32  # asm-generic/socket.h
# Socket buffers of the relay's UDP sockets: a burst that arrives while the loop is busy elsewhere waits
# here instead of being dropped (the 208 KiB default holds ~170 full datagrams).
UDP_BUFFER = 4 << 20


class OriginalDstUnavailable(OSError):
    """The connection was not redirected by netfilter (someone connected to the port directly)."""


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT / IPV6_TRANSPARENT (needs CAP_NET_ADMIN).

    On a listening socket: accept connections TPROXY steered to us for any destination; the accepted
    socket's local address is then the original destination. On an outgoing socket: allow binding to a
    non-local address (the client's), so the server sees the real client (uproxy's mode).
    """
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def set_freebind(sock: socket.socket) -> None:
    """IP_FREEBIND: bind before the address exists locally (IPv4 and, on Linux, IPv6 sockets too)."""
    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)


def set_mark(sock: socket.socket, mark: int) -> None:
    """SO_MARK: packets of this socket carry ``mark``, which our capture rules skip (no loops)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def is_local_address(host: str) -> bool:
    """Whether ``host`` is an address of this namespace: only those can be bound without
    IP_TRANSPARENT/IP_FREEBIND (one cheap bind of an unconnected UDP socket, no packet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def unmap(host: str) -> str:
    """``::ffff:10.0.0.1`` -> ``10.0.0.1``: an IPv4 peer seen through a dual-stack IPv6 socket."""
    if host[:7].lower() != "::ffff:":  # the common case, without parsing (this runs per datagram)
        return host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return host


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a REDIRECTed connection was heading to, from conntrack (SO_ORIGINAL_DST).

    The IPv4-mapped trap: on a dual-stack IPv6 socket an IPv4 client's connection is tracked as IPv4,
    so the IPv4 option must be asked even though the socket is AF_INET6.
    """
    peer = sock.getpeername()[0]
    try:
        if sock.family == socket.AF_INET6 and unmap(peer) == peer:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
            port = struct.unpack_from("!H", raw, 2)[0]
            return str(ipaddress.IPv6Address(raw[8:24])), port
        raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    except OSError as e:
        raise OriginalDstUnavailable(e.errno, "no original destination (connection was not redirected)") from None
    port = struct.unpack_from("!H", raw, 2)[0]
    return str(ipaddress.IPv4Address(raw[4:8])), port


def set_recv_origdst(sock: socket.socket) -> None:
    """IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR: each datagram read with ``recvmsg`` carries, as
    ancillary data, the destination it was sent to; with TPROXY that is the original destination (the
    socket's own address is only the port the rule steered it to). Read it with ``parse_origdst``."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)


def parse_origdst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The original destination (host, port) in ``recvmsg`` ancillary data from ``set_recv_origdst``:
    a struct sockaddr_in (IPv4) or sockaddr_in6 (IPv6, IPv4-mapped addresses unmapped); None without
    one (then the datagram was not steered by TPROXY, or the cmsg buffer was too small)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), struct.unpack_from("!H", data, 2)[0]
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            return unmap(socket.inet_ntop(socket.AF_INET6, data[8:24])), struct.unpack_from("!H", data, 2)[0]
    return None


def set_big_buffers(sock: socket.socket, size: int = UDP_BUFFER) -> None:
    """SO_RCVBUFFORCE / SO_SNDBUFFORCE: ``size``-byte socket buffers (the kernel doubles the number for
    its bookkeeping). The FORCE options pass net.core.rmem_max/wmem_max and need CAP_NET_ADMIN, which
    TPROXY needs anyway; without it the plain SO_RCVBUF/SO_SNDBUF are set, capped at those maxima."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
