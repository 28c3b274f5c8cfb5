"""The source port of a connection that leaves from the client's address to an app in this namespace.

An ingress sidecar that preserves the source dials the app from the client's address, and the app's
socket for it then has the 4-tuple (app:port, client:P). Any socket here that already has that tuple
(the gate's accepted socket of a client connection from port P, alive or in TIME_WAIT, in any worker)
would take the SYN instead of the app's listener: the connection stalls (an ACK instead of a SYN-ACK,
a retransmit a second later) or fails. The client's own port is always such a port; a random one is
such a port with the odds of (client connections of the last minute) / (ephemeral ports). So the port
is chosen here, skipping those the kernel reports in use, asked through sock_diag's exact lookup
(NETLINK_SOCK_DIAG, one request and one answer, no dump).
"""

from __future__ import annotations

import errno
import functools
import os
import random
import socket
import struct

__all__ = ["TCP_LISTEN", "bind_apart", "local_port_range", "tcp_state"]

NETLINK_SOCK_DIAG = 4  # linux/netlink.h
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
TCP_LISTEN = 10  # include/net/tcp_states.h
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # both cookie words: "any socket with this tuple"
ALL_STATES = 0xFFFFFFFF
# nlmsghdr, then inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (sport, dport
# big-endian, src and dst as 16 bytes each, interface, cookie[2])
_REQUEST = struct.Struct("=IHHII BBBxI 2s2s16s16sIII")
_ANSWER_HEAD = struct.Struct("=IHHII")
# Ports tried before leaving the choice to the kernel: each one taken has the odds above, so 16 in a
# row means something else is wrong (a tiny port range), and the flow still gets a port.
TRIES = 16


class _Diag:
    """One NETLINK_SOCK_DIAG socket per process (a forked worker opens its own: replies are per socket)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        self.seq = 0


_diag: _Diag | None = None


def _socket() -> _Diag:
    global _diag
    if _diag is None or _diag.pid != os.getpid():
        _diag = _Diag()
    return _diag


def _packed(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host).ljust(16, b"\0")


def tcp_state(family: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The TCP state of this namespace's socket with exactly this local and remote address, or None.

    The kernel's lookup falls back to a listener on the local port when no connection matches (then
    TCP_LISTEN is the answer); TIME_WAIT sockets are found too. OSError when sock_diag is missing.
    """
    diag = _socket()
    diag.seq += 1
    request = _REQUEST.pack(_REQUEST.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, diag.seq, 0,
                            family, socket.IPPROTO_TCP, 0, ALL_STATES,
                            struct.pack("!H", local[1]), struct.pack("!H", remote[1]),
                            _packed(family, local[0]), _packed(family, remote[0]), 0,
                            INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    diag.sock.send(request)
    while True:
        answer = diag.sock.recv(65536)
        _, kind, _, seq, _ = _ANSWER_HEAD.unpack_from(answer)
        if seq != diag.seq:
            continue  # the answer to an earlier request given up on
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", answer, _ANSWER_HEAD.size)
            if code in (-errno.ENOENT, 0):
                return None
            raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
        return answer[_ANSWER_HEAD.size + 1]  # inet_diag_msg.idiag_state


@functools.lru_cache(maxsize=1)
def local_port_range() -> tuple[int, int]:
    """The namespace's ephemeral ports (net.ipv4.ip_local_port_range, which IPv6 uses too); read once."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(word) for word in f.read().split())
    return low, high


def bind_apart(sock: socket.socket, host: str, dst: tuple[str, int]) -> None:
    """Bind ``sock`` (IP_TRANSPARENT already set) to ``host`` and a port P such that no socket here has
    the tuple (``dst``, host:P) the app's socket would get; the kernel's pick if none is found."""
    low, high = local_port_range()
    for _ in range(TRIES):
        port = random.randint(low, high)
        try:
            state = tcp_state(sock.family, dst, (host, port))
        except OSError:
            break  # no sock_diag: the kernel's pick, with its odds
        if state is not None and state != TCP_LISTEN:
            continue
        try:
            sock.bind((host, port))
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    sock.bind((host, 0))
