"""The upstream opener's checks, which hold for every flow whatever path it came by: the loop guard on
what is actually dialled (an address, a wildcard listener's local addresses, a name that resolves to
one of ours), the route decision recorded in the flow, and the PROXY header returned, not spliced in.
Real sockets on loopback: the listeners "of ours" are plain listening sockets of the test."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.config import parse_config
from gate.context import Context
from gate.dial import Connect
from gate.errors import GateError, RefusedByPolicy, RejectedByRule, UpstreamUnreachable
from gate.flow import Flow, FlowState
from gate.router import Router
from gate.upstream import Opener, OwnAddresses, Upstream
from sniff import proxy_protocol


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1 (a destination that is not ours)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s


def opener(routes: list[dict[str, object]], own: set[Endpoint], tmp_path: Path) -> Opener:
    config = parse_config({"listeners": [{"name": "l", "kind": "socks5", "listen": "127.0.0.1:1"}],
                           "routes": routes})
    ctx = Context(Router(config.routes), AccessLog(str(tmp_path / "log")), own=frozenset(own))
    return Opener(ctx, "l", 2.0)


def flow_to(host: str, port: int) -> Flow:
    return Flow(listener="l", client=Endpoint("127.0.0.1", 40000), dst=Endpoint(host, port))


async def open_flow(op: Opener, flow: Flow) -> Upstream:
    return await op.open(op.decide(flow), flow)


def test_own_addresses_in_every_spelling_the_kernel_takes() -> None:
    own = OwnAddresses(frozenset({Endpoint("127.0.0.1", 1080), Endpoint("0.0.0.0", 3128)}))
    assert Endpoint("127.0.0.1", 1080) in own
    assert Endpoint("::ffff:127.0.0.1", 1080) in own  # v4-mapped
    assert Endpoint("127.0.0.1", 3128) in own and Endpoint("127.0.0.2", 3128) in own  # a wildcard's local ones
    assert Endpoint("127.0.0.1", 1081) not in own
    assert Endpoint("127.0.0.2", 1080) not in own  # not bound there: a flow to it does not reach us
    assert Endpoint("192.0.2.1", 3128) not in own  # not an address of this host


def test_a_literal_of_ours_is_refused_before_any_connect(tmp_path: Path) -> None:
    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as ours:
            port = ours.getsockname()[1]
            op = opener([{"action": "direct"}], {Endpoint("127.0.0.1", port)}, tmp_path)
            flow = flow_to("127.0.0.1", port)
            with pytest.raises(RefusedByPolicy, match="a loop"):
                await open_flow(op, flow)
            assert flow.state is FlowState.CONNECTING and (flow.rule, flow.action) == ("#0", "direct")
            # the callback path (address literals, no task) refuses the same flows, at once
            got: list[tuple[Upstream | None, GateError | None]] = []
            attempt = op.open_soon(op.decide(flow), flow, Endpoint("127.0.0.1", port), socket.AF_INET,
                                   lambda up, err: got.append((up, err)))
            assert attempt is None and got[0][0] is None and isinstance(got[0][1], RefusedByPolicy)
            op.close()

    asyncio.run(scenario())


def test_a_name_resolving_to_ours_is_refused(tmp_path: Path) -> None:
    """``localhost`` (127.0.0.1 and ::1) to a port our wildcard listeners hold: every address it resolves
    to is ours, so nothing is dialled."""

    async def scenario() -> None:
        with socket.create_server(("0.0.0.0", 0)) as ours:
            port = ours.getsockname()[1]
            op = opener([{"action": "direct"}], {Endpoint("0.0.0.0", port), Endpoint("::", port)}, tmp_path)
            with pytest.raises(RefusedByPolicy, match="localhost: the destination is ugate itself"):
                await open_flow(op, flow_to("localhost", port))
            with pytest.raises(BlockingIOError):
                ours.setblocking(False)
                ours.accept()  # and no connection ever reached us
            op.close()

    asyncio.run(scenario())


def test_only_the_addresses_of_a_name_that_are_not_ours_are_dialled(tmp_path: Path) -> None:
    """With our listener on 127.0.0.1:P only, ``localhost:P`` may still reach [::1]:P (someone else's)."""

    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as ours:
            port = ours.getsockname()[1]
            op = opener([{"action": "direct"}], {Endpoint("127.0.0.1", port)}, tmp_path)
            if "::1" not in {info[4][0] for info in socket.getaddrinfo("localhost", port)}:
                pytest.skip("localhost is not ::1 here")
            theirs = socket.create_server(("::1", port), family=socket.AF_INET6)
            with theirs:
                upstream = await open_flow(op, flow_to("localhost", port))
                assert upstream.sock.getpeername()[0] == "::1"  # not 127.0.0.1: that one is ours
                upstream.sock.close()
            ours.setblocking(False)
            with pytest.raises(BlockingIOError):
                ours.accept()
            op.close()

    asyncio.run(scenario())


def test_the_decision_is_recorded_and_rejects_and_missing_peers_refused(tmp_path: Path,
                                                                        server: socket.socket) -> None:
    port = server.getsockname()[1]

    async def scenario() -> None:
        op = opener([{"match": {"port": [1]}, "action": "reject", "name": "closed"},
                     {"action": "direct", "name": "out"}], set(), tmp_path)
        flow = flow_to("127.0.0.1", 1)
        with pytest.raises(RejectedByRule, match="rejected by closed"):
            await open_flow(op, flow)
        assert (flow.rule, flow.action, flow.upstream) == ("closed", "reject", None)
        ok = flow_to("127.0.0.1", port)
        upstream = await open_flow(op, ok)
        assert (ok.rule, ok.action, upstream.header, upstream.peer) == ("out", "direct", b"", None)
        upstream.sock.close()
        op.close()

    asyncio.run(scenario())


def test_via_without_a_mesh_is_unreachable_not_direct(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = parse_config({"listeners": [{"name": "l", "kind": "socks5", "listen": "127.0.0.1:1"}],
                               "routes": [{"via": "b"}], "mesh": {"identity": str(tmp_path)},
                               "peers": [{"name": "b", "id": "a" * 52, "address": "127.0.0.1:9"}]})
        op = Opener(Context(Router(config.routes), AccessLog("off")), "l", 1.0)
        flow = flow_to("127.0.0.1", 9)
        with pytest.raises(UpstreamUnreachable, match="no mesh"):
            await open_flow(op, flow)
        op.close()

    asyncio.run(scenario())


def test_the_proxy_header_comes_back_with_the_upstream(tmp_path: Path, server: socket.socket) -> None:
    port = server.getsockname()[1]

    async def scenario() -> None:
        op = opener([{"action": "direct", "proxy_protocol": "v1"}], set(), tmp_path)
        flow = flow_to("127.0.0.1", port)
        flow.preread = b"hello"
        upstream = await open_flow(op, flow)
        assert flow.preread == b"hello"  # the flow's own bytes are untouched
        assert proxy_protocol.parse_proxy_header(upstream.header).source == ("127.0.0.1", 40000)
        upstream.sock.close()
        op.close()

    asyncio.run(scenario())


def test_open_soon_connects_by_callbacks(tmp_path: Path, server: socket.socket) -> None:
    port = server.getsockname()[1]

    async def scenario() -> None:
        op = opener([{"action": "direct", "proxy_protocol": "v2"}], set(), tmp_path)
        flow = flow_to("127.0.0.1", port)
        done: asyncio.Future[Upstream] = asyncio.get_running_loop().create_future()
        attempt = op.open_soon(op.decide(flow), flow, Endpoint("127.0.0.1", port), socket.AF_INET,
                               lambda up, err: done.set_result(up) if up else done.set_exception(err))
        assert isinstance(attempt, Connect)
        upstream = await done
        assert upstream.header.startswith(proxy_protocol.V2_SIGNATURE)
        upstream.sock.close()
        op.close()

    asyncio.run(scenario())
