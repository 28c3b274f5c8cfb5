"""The UDP socket options of transparent capture: the original destination in ancillary data (parsed from
the kernel's struct layouts, built here by hand) and the options set on real, unbound sockets."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from tproxy.sockopts import (
    IP_RECVORIGDSTADDR,
    IPV6_RECVORIGDSTADDR,
    parse_origdst,
    set_big_buffers,
    set_recv_origdst,
)


def sockaddr_in(host: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_pton(socket.AF_INET, host)
            + bytes(8))


def sockaddr_in6(host: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + socket.inet_pton(socket.AF_INET6, host)
            + struct.pack("=I", 0))


@pytest.mark.parametrize(("ancdata", "expected"), [
    ([(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, sockaddr_in("192.0.2.1", 443))], ("192.0.2.1", 443)),
    ([(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, sockaddr_in6("2001:db8::1", 53))], ("2001:db8::1", 53)),
    ([(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, sockaddr_in6("::ffff:192.0.2.9", 5201))], ("192.0.2.9", 5201)),
    # another cmsg first (a timestamp, say): skipped
    ([(socket.SOL_SOCKET, 29, bytes(16)), (socket.IPPROTO_IP, IP_RECVORIGDSTADDR, sockaddr_in("10.1.2.3", 1))],
     ("10.1.2.3", 1)),
    ([], None),
    ([(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, sockaddr_in("192.0.2.1", 443)[:7])], None),  # cut short
    ([(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, sockaddr_in6("2001:db8::1", 53)[:23])], None),
])
def test_parse_origdst(ancdata: list[tuple[int, int, bytes]], expected: tuple[str, int] | None) -> None:
    assert parse_origdst(ancdata) == expected


@pytest.mark.parametrize(("family", "level", "option"), [
    (socket.AF_INET, socket.IPPROTO_IP, IP_RECVORIGDSTADDR),
    (socket.AF_INET6, socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR),
])
def test_set_recv_origdst_sets_the_option_of_the_socket_family(family: int, level: int, option: int) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        set_recv_origdst(sock)
        assert sock.getsockopt(level, option) == 1


def test_set_big_buffers() -> None:
    size = 1 << 20
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        set_big_buffers(sock, size)
        # the kernel doubles the number; without CAP_NET_ADMIN the plain option is capped at rmem_max
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 2 * min(size, rmem_max)
