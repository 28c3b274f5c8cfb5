"""Opening upstream TCP connections, with the failure said in our error vocabulary."""

from __future__ import annotations

import asyncio
import errno
import socket

from gate.addr import Endpoint, is_ip
from gate.errors import UpstreamError, UpstreamRefused, UpstreamTimeout, UpstreamUnreachable

__all__ = ["open_tcp", "tune_socket"]


def tune_socket(sock: socket.socket) -> None:
    """Non-blocking, and no Nagle delay: a relay must not hold back the small writes it forwards."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _addresses(dst: Endpoint) -> list[tuple[int, tuple[str, int]]]:
    if is_ip(dst.host):
        family = socket.AF_INET6 if ":" in dst.host else socket.AF_INET
        return [(family, (dst.host, dst.port))]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(dst.host, dst.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UpstreamUnreachable(f"{dst.host}: {e.strerror}") from None
    return [(family, (str(addr[0]), int(addr[1]))) for family, _, _, _, addr in infos]


async def open_tcp(dst: Endpoint, timeout: float) -> socket.socket:
    """Connect to ``dst`` (resolving a name, trying each address in turn) within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    error: UpstreamError = UpstreamUnreachable(f"{dst}: no address")
    try:
        async with asyncio.timeout(timeout):
            for family, addr in await _addresses(dst):
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    tune_socket(sock)
                    await loop.sock_connect(sock, addr)
                    return sock
                except ConnectionRefusedError:
                    sock.close()
                    error = UpstreamRefused(f"{dst}: connection refused")
                except OSError as e:
                    sock.close()
                    name = errno.errorcode.get(e.errno or 0, str(e))
                    error = UpstreamUnreachable(f"{dst}: {name}")
                except BaseException:
                    sock.close()
                    raise
    except TimeoutError:
        raise UpstreamTimeout(f"{dst}: no answer within {timeout:g}s") from None
    raise error
