"""The flow runner's states, driven with real loopback sockets: each path a flow can take ends in DONE
with exactly one access-log record saying why (relayed to EOF, refused, handshake errors and timeouts,
a bug, shutdown), and the states are visited in order."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.config import parse_config
from gate.context import Context
from gate.deadlines import Sweeper
from gate.errors import ClientProtocolError
from gate.flow import Close, Flow, FlowState
from gate.router import Router
from gate.runner import FlowRunner, relay_close
from splice import Relay


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def runner(log: Path, **listener: Any) -> FlowRunner:
    config = parse_config({"listeners": [{"name": "f", "kind": "forward", "listen": "127.0.0.1:1",
                                          "to": "127.0.0.1:2", **listener}],
                           "routes": [{"match": {"port": [9]}, "action": "reject", "name": "nine"},
                                      {"action": "direct"}]})
    return FlowRunner(config.listeners[0], Context(Router(config.routes), AccessLog(str(log))))


async def accepted_pair() -> tuple[socket.socket, socket.socket]:
    """(client side, gate side) of one loopback TCP connection, non-blocking on the gate's side."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
    conn.setblocking(False)
    return client, conn


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Traced(Flow):
    """A Flow that remembers every state it was put in."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            self.__dict__.setdefault("trace", []).append(value)
        super().__setattr__(name, value)


def test_a_forwarded_flow_goes_sniffing_routed_connecting_relaying_done(tmp_path: Path) -> None:
    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            r = runner(tmp_path / "log", sniff=True)
            client, conn = await accepted_pair()
            flow = Traced(listener="f", client=Endpoint("127.0.0.1", 1), dst=Endpoint(*server.getsockname()))
            client.sendall(b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")
            r.forward(conn, flow)
            assert flow.id in r.ctx.live
            await until(lambda: flow.state is FlowState.RELAYING)
            upstream, _ = server.accept()
            assert upstream.recv(100).startswith(b"GET / HTTP/1.1")  # the sniffed bytes went first
            client.close()
            upstream.close()
            await until(lambda: flow.state is FlowState.DONE)
            assert flow.__dict__["trace"] == [FlowState.ACCEPTED, FlowState.SNIFFING, FlowState.ROUTED,
                                              FlowState.CONNECTING, FlowState.RELAYING, FlowState.DONE]
            assert flow.id not in r.ctx.live and r.active == 0
            await r.drain(0)

    asyncio.run(scenario())
    [record] = records(tmp_path / "log")
    assert (record["close"], record["protocol"], record["host"], record["rule"]) == ("eof", "http", "x.test", "#1")


def test_a_rejected_flow_is_reset_and_logged_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        r = runner(tmp_path / "log")
        client, conn = await accepted_pair()
        flow = Flow(listener="f", client=Endpoint("127.0.0.1", 1), dst=Endpoint("127.0.0.1", 9))
        r.forward(conn, flow)
        await until(lambda: flow.state is FlowState.DONE)
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        await r.drain(0)

    asyncio.run(scenario())
    [record] = records(tmp_path / "log")
    assert (record["close"], record["detail"], record["action"]) == ("rejected", "rejected by nine", "reject")


@pytest.mark.parametrize(("raised", "close"), [
    (ClientProtocolError("bad greeting"), "client error"),
    (TimeoutError(), "handshake timeout"),
    (ConnectionResetError(104, "Connection reset by peer"), "client error"),
    (ValueError("a bug"), "internal error"),
])
def test_a_handshake_that_fails_ends_the_flow_with_its_reason(tmp_path: Path, raised: BaseException,
                                                               close: str) -> None:
    async def scenario() -> None:
        r = runner(tmp_path / "log")
        client, conn = await accepted_pair()
        flow = Flow(listener="f", client=Endpoint("127.0.0.1", 1))

        async def handshake(sock: socket.socket, f: Flow) -> None:
            assert f.state is FlowState.HANDSHAKE
            raise raised

        r.handshake(conn, flow, handshake)
        await until(lambda: flow.state is FlowState.DONE)
        assert conn.fileno() == -1 and r.active == 0  # the client socket is closed, nothing is left
        client.close()
        await r.drain(0)

    asyncio.run(scenario())
    assert [r["close"] for r in records(tmp_path / "log")] == [close]


def test_drain_cuts_what_is_still_in_a_handshake(tmp_path: Path) -> None:
    async def scenario() -> None:
        r = runner(tmp_path / "log")
        client, conn = await accepted_pair()
        flow = Flow(listener="f", client=Endpoint("127.0.0.1", 1))
        forever: Callable[[socket.socket, Flow], Awaitable[None]] = lambda s, f: asyncio.Event().wait()  # noqa: E731
        r.handshake(conn, flow, forever)
        await asyncio.sleep(0.01)
        await r.drain(0.05)
        assert flow.state is FlowState.DONE
        client.close()

    asyncio.run(scenario())
    assert [r["close"] for r in records(tmp_path / "log")] == ["shutdown"]


def test_finish_happens_once_and_the_first_reason_stands(tmp_path: Path) -> None:
    ctx = Context(Router(()), AccessLog(str(tmp_path / "log")))
    flow = ctx.begin(Flow(listener="f", client=Endpoint("127.0.0.1", 1)))
    flow.closing(Close.REFUSED, "first")
    ctx.finish(flow, Close.CLIENT_ERROR, "later")
    ctx.finish(flow, Close.SHUTDOWN)
    assert [(r["close"], r["detail"]) for r in records(tmp_path / "log")] == [("refused", "first")]
    assert flow.id not in ctx.live


def test_relay_reasons_map_to_close_kinds() -> None:
    assert relay_close("eof") == (Close.EOF, None)
    assert relay_close("idle timeout") == (Close.IDLE, None)
    assert relay_close("client reset") == (Close.CLIENT_RESET, None)
    assert relay_close("upstream EHOSTUNREACH") == (Close.UPSTREAM_RESET, "EHOSTUNREACH")


def test_a_relay_that_cannot_start_still_ends_its_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen once under fuzzing: uvloop refused a poll handle in Relay.start. The flow must still end,
    with its descriptors and its max_flows slot freed."""

    def broken(self: Relay) -> None:
        raise RuntimeError("unable to perform operation on <UVPoll closed=True>")

    monkeypatch.setattr(Relay, "start", broken)

    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            r = runner(tmp_path / "log")
            client, conn = await accepted_pair()
            flow = Flow(listener="f", client=Endpoint("127.0.0.1", 1), dst=Endpoint(*server.getsockname()))
            r.forward(conn, flow)
            await until(lambda: flow.state is FlowState.DONE)
            assert conn.fileno() == -1 and r.active == 0 and not r.ctx.live
            client.close()
            await r.drain(0)

    asyncio.run(scenario())
    assert [r["close"] for r in records(tmp_path / "log")] == ["internal error"]


def test_a_deadline_that_raises_keeps_the_sweeper_running() -> None:
    class Item:
        def __init__(self, fail: bool) -> None:
            self.fail, self.expired = fail, False

        def deadline(self) -> float:
            return 0.0

        def expire(self) -> None:
            self.expired = True
            if self.fail:
                raise ValueError("a bug in one item")
            sweeper.discard(self)

    async def scenario() -> None:
        nonlocal sweeper
        sweeper = Sweeper(asyncio.get_running_loop(), 0.01)
        bad, good = Item(True), Item(False)
        sweeper.add(bad)
        sweeper.add(good)
        await until(lambda: bad.expired and good.expired)
        late = Item(False)
        sweeper.add(late)  # the timer still runs: later deadlines expire too
        await until(lambda: late.expired)
        sweeper.close()

    sweeper: Sweeper
    asyncio.run(scenario())
