"""tproxy_udp's shell over the session table: datagrams fed as its listener socket hands them over (in
the shared buffer), answered with real upstream sockets that send to a closed local port, and judged by
the access-log records and the sessions left open."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.config import Match, Route, parse_config
from gate.context import Context
from gate.listeners import tproxy_udp
from gate.router import Router
from tests.gate.udp.test_sessions import DNS_QUERY
from tests.sniff.test_quic import datagrams

SERVER = Endpoint("127.0.0.1", 9)  # the datagrams relayed go to a closed local port, nowhere else
A, B = Endpoint("10.0.0.1", 5000), Endpoint("10.0.0.2", 5000)


def listener(log: Path, routes: tuple[Route, ...] | None = None, **spec: Any) -> tproxy_udp.TproxyUdpListener:
    config = parse_config({"listeners": [{"name": "u", "kind": "tproxy_udp", "listen": "0.0.0.0:15002", **spec}],
                           "routes": [{"action": "direct"}]})
    ctx = Context(Router(routes if routes is not None else config.routes), AccessLog(str(log)))
    return tproxy_udp.TproxyUdpListener(config.listeners[0], ctx)  # type: ignore[arg-type]


def feed(gate: tproxy_udp.TproxyUdpListener, client: Endpoint, dst: Endpoint, payload: bytes) -> None:
    """As ``_on_listener`` does after recvmsg_into() filled the shared buffer."""
    tproxy_udp._buffer[: len(payload)] = payload
    gate._from_client(client, dst, len(payload))


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@contextmanager
def real_client() -> Iterator[tuple[socket.socket, Endpoint]]:
    """A client socket on loopback, where reply sockets (bound to loopback remotes) can answer it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock, Endpoint(*sock.getsockname())
    finally:
        sock.close()


def answer(upstream: socket.socket, remote: tuple[str, int], payload: bytes = b"answer") -> None:
    """A datagram from ``remote`` to the session's upstream port (SO_REUSEADDR: the reply socket that
    answers as ``remote`` binds the same address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(remote)
        sock.sendto(payload, ("127.0.0.1", upstream.getsockname()[1]))


def test_held_bytes_are_bounded_and_released(tmp_path: Path) -> None:
    first, second, _ = datagrams("chromium_quic_initial.bin")

    async def scenario() -> None:
        gate = listener(tmp_path / "log")
        gate.table.max_held_bytes = len(first) + 100  # room for one held datagram
        feed(gate, A, SERVER, first)
        assert list(gate.table.held) == [(A, None)] and gate.table.held_bytes == len(first)
        assert gate.timer is not None  # the sniff wait's end
        feed(gate, B, SERVER, first)  # no room to wait: routed without the name
        assert gate.sessions[(B, None)].flow.sni is None and list(gate.table.held) == [(A, None)]
        feed(gate, A, SERVER, second)  # the hello is whole: routed by its name
        session = gate.sessions[(A, None)]
        assert session.flow.sni == "www.example.test" and session.flow.bytes_up == len(first) + len(second)
        assert not gate.table.held and gate.table.held_bytes == 0
        assert dict(gate.ctx.sniff_outcomes) == {"quic": 2}
        await gate.drain(0)
        assert gate.timer is None and not gate.sessions

    asyncio.run(scenario())
    assert [(r["client"], r["sni"], r["close"]) for r in records(tmp_path / "log")] == [
        (str(B), None, "shutdown"), (str(A), "www.example.test", "shutdown")]


def test_a_via_route_is_refused_not_relayed_direct(tmp_path: Path) -> None:
    """Until UDP crosses the mesh, a session routed via a peer must not quietly go direct."""
    via = Route(index=0, name="to-b", match=Match(), action="via", via="b")

    async def scenario() -> None:
        gate = listener(tmp_path / "log", routes=(via,))
        feed(gate, A, SERVER, DNS_QUERY)
        feed(gate, A, SERVER, DNS_QUERY)  # the client retries: asked again, refused again
        assert not gate.sessions and gate.table.held_bytes == 0
        await gate.drain(0)

    asyncio.run(scenario())
    detail = "via b is TCP-only (UDP over the mesh is not built yet)"
    assert [(r["rule"], r["action"], r["upstream"], r["bytes_up"], r["close"], r["detail"])
            for r in records(tmp_path / "log")] == [("to-b", "via", None, 0, "refused", detail)] * 2


def test_a_direct_session_relays_and_answers_are_looked_up_by_the_table_rule(tmp_path: Path) -> None:
    async def scenario() -> None:
        gate = listener(tmp_path / "log", mapping="symmetric")
        feed(gate, A, SERVER, DNS_QUERY)
        feed(gate, A, SERVER, b"again")  # the open session: straight to its upstream socket
        session = gate.sessions[(A, SERVER)]
        assert session.flow.action == "direct" and session.flow.bytes_up == len(DNS_QUERY) + 5
        # symmetric: a stranger's answer to the session's port gets no reply socket
        assert gate._reply_for(session, session.key, ("127.0.0.2", 9)) is None
        await gate.drain(0)

    asyncio.run(scenario())
    [record] = records(tmp_path / "log")
    assert record["protocol"] == "dns" and record["close"] == "shutdown"


def test_an_idle_session_ends_on_the_loop_timer(tmp_path: Path) -> None:
    async def scenario() -> None:
        gate = listener(tmp_path / "log", session_timeout=0.2)
        feed(gate, A, SERVER, DNS_QUERY)
        assert (A, None) in gate.sessions and gate.timer is not None
        deadline = asyncio.get_running_loop().time() + 5
        while gate.sessions:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert gate.timer is None  # nothing left to wake up for
        await gate.drain(0)

    asyncio.run(scenario())
    [record] = records(tmp_path / "log")
    assert record["close"] == "idle timeout" and record["bytes_up"] == len(DNS_QUERY)


def test_a_remote_that_keeps_writing_does_not_keep_the_session_open(tmp_path: Path) -> None:
    """Answers pass to the client, but only the client's own datagrams postpone the idle expiry."""
    async def scenario() -> None:
        with real_client() as (_, address):
            gate = listener(tmp_path / "log", session_timeout=0.2)
            feed(gate, address, SERVER, DNS_QUERY)
            session = gate.sessions[(address, None)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3
            while gate.sessions:
                assert loop.time() < deadline, "answers kept the session open"
                answer(session.upstream, ("127.0.0.2", 3478))
                await asyncio.sleep(0.01)
            assert session.flow.bytes_down > 0  # the remote's datagrams did pass
            await gate.drain(0)

    asyncio.run(scenario())
    [record] = records(tmp_path / "log")
    assert record["close"] == "idle timeout" and record["bytes_down"] > 0
