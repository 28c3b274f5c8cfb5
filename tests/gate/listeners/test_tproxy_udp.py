"""tproxy_udp's shell over the session table: datagrams fed as its listener socket hands them over (in
the shared buffer), answered with real upstream sockets that send to a closed local port, and judged by
the access-log records and the sessions left open."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.config import Match, Route, TproxyUdpSpec, parse_config
from gate.context import Context
from gate.errors import ConfigError
from gate.listeners import tproxy_udp
from gate.router import Router
from gate.udp.sessions import MAX_REMOTES_PER_SESSION, MAX_REPLY_SOCKETS, MAX_SESSIONS_PER_CLIENT
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


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


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


def warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.levelno == logging.WARNING and r.name == "ugate" for r in caplog.records)


def test_held_bytes_are_bounded_and_released(tmp_path: Path) -> None:
    first, second, _ = datagrams("chromium_quic_initial.bin")

    async def scenario() -> None:
        gate = listener(tmp_path / "log")
        gate.table.max_held_bytes = len(first) + 100  # room for one held datagram
        feed(gate, A, SERVER, first)
        assert list(gate.table.held) == [(A, None)] and gate.table.held_bytes == len(first)
        assert gate.timer.armed  # the sniff wait's end
        feed(gate, B, SERVER, first)  # no room to wait: routed without the name
        assert gate.sessions[(B, None)].flow.sni is None and list(gate.table.held) == [(A, None)]
        feed(gate, A, SERVER, second)  # the hello is whole: routed by its name
        session = gate.sessions[(A, None)]
        assert session.flow.sni == "www.example.test" and session.flow.bytes_up == len(first) + len(second)
        assert not gate.table.held and gate.table.held_bytes == 0
        assert dict(gate.ctx.sniff_outcomes) == {"quic": 2}
        await gate.drain(0)
        assert not gate.timer.armed and not gate.sessions

    asyncio.run(scenario())
    assert [(r["client"], r["sni"], r["close"]) for r in records(tmp_path / "log")] == [
        (str(B), None, "shutdown"), (str(A), "www.example.test", "shutdown")]


def test_a_via_route_without_a_mesh_is_refused_not_relayed_direct(tmp_path: Path) -> None:
    """A session routed via a peer this gate has no tunnel for must not quietly go direct."""
    via = Route(index=0, name="to-b", match=Match(), action="via", via="b")

    async def scenario() -> None:
        gate = listener(tmp_path / "log", routes=(via,))
        feed(gate, A, SERVER, DNS_QUERY)
        feed(gate, A, SERVER, DNS_QUERY)  # the client retries: asked again, refused again
        assert not gate.sessions and gate.table.held_bytes == 0
        await gate.drain(0)

    asyncio.run(scenario())
    detail = "via: this gate has no mesh section"
    assert [(r["rule"], r["action"], r["upstream"], r["bytes_up"], r["close"], r["detail"])
            for r in records(tmp_path / "log")] == [("to-b", "via", None, 0, "upstream error", detail)] * 2


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
        assert (A, None) in gate.sessions and gate.timer.armed
        deadline = asyncio.get_running_loop().time() + 5
        while gate.sessions:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert not gate.timer.armed  # nothing left to wake up for
        await gate.drain(0)

    asyncio.run(scenario())
    [record] = records(tmp_path / "log")
    assert record["close"] == "idle timeout" and record["bytes_up"] == len(DNS_QUERY)


# -- bounds ------------------------------------------------------------------------------------------


def test_the_caps_are_spec_keys_with_the_tables_defaults() -> None:
    config = parse_config({"listeners": [{"name": "u", "kind": "tproxy_udp", "listen": "0.0.0.0:15002",
                                          "max_sessions_per_client": 8, "max_remotes_per_session": 4,
                                          "max_reply_sockets": 100}],
                           "routes": [{"action": "direct"}]})
    spec = config.listeners[0]
    assert isinstance(spec, TproxyUdpSpec)
    assert (spec.max_sessions_per_client, spec.max_remotes_per_session, spec.max_reply_sockets) == (8, 4, 100)
    assert (TproxyUdpSpec.max_sessions_per_client, TproxyUdpSpec.max_remotes_per_session,
            TproxyUdpSpec.max_reply_sockets) == (MAX_SESSIONS_PER_CLIENT, MAX_REMOTES_PER_SESSION,
                                                 MAX_REPLY_SOCKETS)
    for key in ("max_remotes_per_session", "max_reply_sockets"):
        with pytest.raises(ConfigError, match=key):
            parse_config({"listeners": [{"name": "u", "kind": "tproxy_udp", "listen": "0.0.0.0:15002", key: 0}],
                          "routes": [{"action": "direct"}]})


def test_answers_from_a_thousand_remotes_hold_at_most_the_cap_of_reply_sockets(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The descriptor figure: a full-cone session answered from 1,000 remotes (one host could use 64k
    source ports) holds max_remotes_per_session reply sockets; the rest of the answers are dropped,
    counted, and logged once."""
    caplog.set_level(logging.WARNING, logger="ugate")
    remotes = [(f"127.1.{i // 250}.{i % 250 + 1}", 3478) for i in range(1000)]

    async def scenario() -> None:
        with real_client() as (client, address):
            gate = listener(tmp_path / "log")
            feed(gate, address, SERVER, DNS_QUERY)
            session = gate.sessions[(address, None)]
            before = open_fds()
            for remote in remotes:
                answer(session.upstream, remote)
            for _ in range(20):  # as the loop would call the reader: 128 datagrams a wake-up
                gate._on_upstream(session, session.key)
            grew = open_fds() - before
            print(f"descriptors: {grew} more for answers from {len(remotes)} remotes")
            assert grew == len(session.replies) == MAX_REMOTES_PER_SESSION
            assert len(session.by_remote) <= MAX_REMOTES_PER_SESSION
            heard = set()
            while True:
                try:
                    heard.add(client.recvfrom(100)[1])
                except BlockingIOError:
                    break
            assert heard == set(remotes[:MAX_REMOTES_PER_SESSION])  # the first remotes are answered
            assert gate.table.dropped == {"max_remotes_per_session": len(remotes) - MAX_REMOTES_PER_SESSION}
            assert warnings(caplog) == 1
            await gate.drain(0)
            assert open_fds() - before == -1  # the session's upstream socket too

    asyncio.run(scenario())


def test_a_thousand_sessions_answered_from_five_remotes_stay_within_the_reply_socket_budget(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The listener-wide descriptor figure: 1,000 full-cone sessions (4 addresses x 250 ports, under
    the per-address cap) each answered from 5 remotes would want 5,000 reply sockets; the listener opens
    MAX_REPLY_SOCKETS of them, never more, drops (counts, logs once) the other answers, and the sockets
    of sessions that idle out are there for the sessions left."""
    caplog.set_level(logging.WARNING, logger="ugate")
    clients = [Endpoint(f"127.3.0.{host}", port) for host in range(1, 5) for port in range(20000, 20250)]
    remotes = [(f"127.1.0.{i}", 3478) for i in range(1, 6)]
    wanted = len(clients) * len(remotes)

    async def scenario() -> None:
        gate = listener(tmp_path / "log")
        gc.collect()  # earlier tests' garbage must not close its sockets while we count ours
        before = open_fds()
        for client in clients:
            feed(gate, client, SERVER, DNS_QUERY)
        sessions = [gate.sessions[(client, None)] for client in clients]
        assert open_fds() - before == len(sessions) == 1000

        def answer_all(of: list[tproxy_udp._Session]) -> None:
            for session in of:
                for remote in remotes:
                    answer(session.upstream, remote)
                gate._on_upstream(session, session.key)
                held = sum(len(s.replies) for s in gate.sessions.values())
                assert held == gate.table.reply_sockets <= MAX_REPLY_SOCKETS

        answer_all(sessions)
        grew = open_fds() - before - len(sessions)
        print(f"reply sockets: {grew} opened for {wanted} wanted by {len(sessions)} sessions")
        assert grew == gate.table.reply_sockets == MAX_REPLY_SOCKETS
        assert gate.table.dropped == {"max_reply_sockets": wanted - MAX_REPLY_SOCKETS}
        assert warnings(caplog) == 1
        # the first half idle out (the shell's own path: the table's timer, its Expired closed) while
        # the second half keep sending: their answers now find reply sockets
        kept = sessions[500:]
        now = gate.loop.time()
        for action in gate.table.timer(now + 30):  # the first sweep sees every session's first bytes
            gate._act(action)
        for session in kept:
            session.flow.bytes_up += 1
        for action in gate.table.timer(now + 95):
            gate._act(action)
        assert list(gate.sessions.values()) == kept
        assert gate.table.reply_sockets == sum(len(s.replies) for s in kept) < MAX_REPLY_SOCKETS
        answer_all(kept)
        assert all(len(s.replies) == len(remotes) for s in kept)
        assert open_fds() - before == len(kept) * (1 + len(remotes)) == len(kept) + gate.table.reply_sockets
        assert gate.table.dropped == {"max_reply_sockets": wanted - MAX_REPLY_SOCKETS}
        await gate.drain(0)
        assert open_fds() == before and gate.table.reply_sockets == 0

    asyncio.run(scenario())
    logged = records(tmp_path / "log")
    assert sorted(r["close"] for r in logged) == ["idle timeout"] * 500 + ["shutdown"] * 500


def test_one_host_from_a_thousand_ports_gets_max_sessions_per_client(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The descriptor figure for sessions: full-cone makes a session (an upstream socket) per source
    port; one host's 1,000 ports get MAX_SESSIONS_PER_CLIENT of them, the refusals one record."""
    caplog.set_level(logging.WARNING, logger="ugate")

    async def scenario() -> None:
        gate = listener(tmp_path / "log")
        before = open_fds()
        for port in range(1000, 2000):
            feed(gate, Endpoint("10.0.0.1", port), SERVER, DNS_QUERY)
        feed(gate, B, SERVER, DNS_QUERY)  # another address is not affected
        grew = open_fds() - before
        print(f"descriptors: {grew} more for 1,000 source ports of one host and one of another")
        assert len(gate.sessions) == grew == MAX_SESSIONS_PER_CLIENT + 1
        assert gate.table.dropped == {"max_sessions_per_client": 1000 - MAX_SESSIONS_PER_CLIENT}
        assert warnings(caplog) == 1
        await gate.drain(0)

    asyncio.run(scenario())
    logged = records(tmp_path / "log")
    refused = [r for r in logged if r["close"] == "refused"]
    assert [(r["client"], r["dst"], r["bytes_up"]) for r in refused] == [(f"10.0.0.1:{1000 + MAX_SESSIONS_PER_CLIENT}",
                                                                         str(SERVER), 0)]
    assert len(logged) == MAX_SESSIONS_PER_CLIENT + 2  # the open sessions' records, and the one refusal


def test_symmetric_sessions_of_one_client_are_capped(tmp_path: Path) -> None:
    async def scenario() -> None:
        gate = listener(tmp_path / "log", mapping="symmetric", max_sessions_per_client=3)
        for port in range(20, 30):  # closed local ports: one session per destination
            feed(gate, A, Endpoint("127.0.0.1", port), DNS_QUERY)
        assert sorted(key[1].port for key in gate.sessions if key[1]) == [20, 21, 22]
        await gate.drain(0)

    asyncio.run(scenario())
    assert [r["close"] for r in records(tmp_path / "log")].count("refused") == 1


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
