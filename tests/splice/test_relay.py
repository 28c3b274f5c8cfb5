"""The relay on real loopback TCP sockets: byte-exact both ways, half-close, resets, idle, pipe pool."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from gate.deadlines import Sweeper, sweep_interval
from splice import PIPE_POOL, Relay

PATHS = ["splice", "copy"]


async def _pair(loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, socket.socket]:
    """A connected pair of kernel TCP sockets (both non-blocking)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    a = socket.socket()
    a.setblocking(False)
    accept = loop.create_task(loop.sock_accept(listener))
    await loop.sock_connect(a, listener.getsockname())
    b, _ = await accept
    b.setblocking(False)
    listener.close()
    return a, b


async def _relayed(path: str, idle: float = 30.0) -> tuple[socket.socket, socket.socket, Relay, asyncio.Future[Relay]]:
    """client <-> [relay] <-> server; returns the outer ends, the relay and a future set when it ends."""
    loop = asyncio.get_running_loop()
    client, gw_client = await _pair(loop)
    gw_upstream, server = await _pair(loop)
    done: asyncio.Future[Relay] = loop.create_future()
    relay = Relay(gw_client, gw_upstream, mode=path, idle_timeout=idle, on_done=done.set_result,
                  sweeper=Sweeper(asyncio.get_running_loop(), sweep_interval(idle)))
    relay.start()
    return client, server, relay, done


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while data := await loop.sock_recv(sock, 1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def run(test: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(test(), 30))


@pytest.mark.parametrize("path", PATHS)
def test_both_directions_byte_exact_with_half_close(path: str) -> None:
    up_data, down_data = os.urandom(8 << 20), os.urandom(3 << 20)

    async def test() -> None:
        loop = asyncio.get_running_loop()
        client, server, relay, done = await _relayed(path)
        assert relay.path == path

        async def client_side() -> bytes:
            await loop.sock_sendall(client, up_data)
            client.shutdown(socket.SHUT_WR)  # half-close: the server must still be able to answer
            return await _read_all(client)

        async def server_side() -> bytes:
            received = await _read_all(server)  # ends only if the relay passed the FIN on
            await loop.sock_sendall(server, down_data)
            server.shutdown(socket.SHUT_WR)
            return received

        got_down, got_up = await asyncio.gather(client_side(), server_side())
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up_data).digest()
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down_data).digest()
        finished = await done
        assert (finished.close_reason, finished.bytes_up, finished.bytes_down) == ("eof", len(up_data), len(down_data))
        client.close()
        server.close()

    run(test)


@pytest.mark.parametrize("path", PATHS)
def test_reset_by_server_reaches_client_as_reset(path: str) -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        client, server, _, done = await _relayed(path)
        await loop.sock_sendall(client, b"hello")
        assert await loop.sock_recv(server, 5) == b"hello"
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        server.close()  # RST
        assert (await done).close_reason == "upstream reset"
        with pytest.raises(ConnectionResetError):
            await loop.sock_recv(client, 10)
        client.close()

    run(test)


@pytest.mark.parametrize("path", PATHS)
def test_idle_timeout_closes_both_sides(path: str) -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        client, server, _, done = await _relayed(path, idle=0.3)
        await loop.sock_sendall(client, b"x")
        assert await loop.sock_recv(server, 1) == b"x"
        started = loop.time()
        assert (await done).close_reason == "idle timeout"
        assert 0.25 < loop.time() - started < 1.0
        client.close()
        server.close()

    run(test)


@pytest.mark.parametrize("path", PATHS)
def test_backpressure_slow_reader_still_byte_exact(path: str) -> None:
    data = os.urandom(32 << 20)  # more than the socket buffers on the way hold

    async def test() -> None:
        loop = asyncio.get_running_loop()
        client, server, relay, done = await _relayed(path)

        async def slow_read() -> bytes:
            await asyncio.sleep(0.3)  # let every buffer on the way fill up first
            return await _read_all(server)

        sender = loop.create_task(loop.sock_sendall(client, data))
        reader = loop.create_task(slow_read())
        await asyncio.sleep(0.2)
        assert not sender.done() and relay.up.writing  # type: ignore[attr-defined]
        await sender
        client.shutdown(socket.SHUT_WR)
        assert hashlib.sha256(await reader).digest() == hashlib.sha256(data).digest()
        server.close()
        await done
        client.close()

    run(test)


def test_idle_spliced_flows_hold_no_pipes() -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        PIPE_POOL.clear()
        before = len(os.listdir("/proc/self/fd"))
        flows = [await _relayed("splice") for _ in range(20)]
        for client, server, _, _ in flows:
            await loop.sock_sendall(client, b"ping")
            assert await loop.sock_recv(server, 4) == b"ping"
        # 20 flows x 4 sockets; the pipes went back to the pool, which holds at most a few pairs
        extra = len(os.listdir("/proc/self/fd")) - before - 20 * 4
        assert extra <= 4, extra
        assert all(r.up.pipe is None and r.down.pipe is None for _, _, r, _ in flows)  # type: ignore[attr-defined]
        for client, server, relay, _ in flows:
            relay.abort("test over")
            client.close()
            server.close()

    run(test)


def test_auto_copies_small_exchanges_and_splices_bulk() -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        client, server, relay, done = await _relayed("auto")
        await loop.sock_sendall(client, b"GET / HTTP/1.0\r\n\r\n")
        assert await loop.sock_recv(server, 100) == b"GET / HTTP/1.0\r\n\r\n"
        assert relay.path == "copy"
        bulk = os.urandom(4 << 20)
        await loop.sock_sendall(server, bulk)
        server.shutdown(socket.SHUT_WR)
        client.shutdown(socket.SHUT_WR)
        assert await _read_all(client) == bulk
        assert relay.path == "splice"  # the bulk direction moved over
        assert (await done).bytes_down == len(bulk)
        client.close()
        server.close()

    run(test)
