"""UDP over the mesh (CONNECT-UDP, RFC 9298) on loopback: gate B runs as its own process with an h2
listener; gate A's side is the upstream opener called in the test (the path every UDP listener takes
for a route ``via: b``), or a raw HTTP/2 peer (tests.e2e.test_mesh_abuse.Peer) for what a compromised
gate could send. The far end is a real UDP echo server."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.config import parse_config
from gate.context import Context
from gate.errors import GateError, RejectedByRule, UpstreamUnreachable
from gate.flow import Flow
from gate.mesh.capsules import CapsuleReader, datagram_capsule, encode_varint
from gate.mesh.datagrams import MAX_QUEUED_BYTES
from gate.mesh.dialer import Mesh
from gate.mesh.trust import Trust
from gate.mesh.udp_via import ViaUdp
from gate.router import Router
from gate.upstream import Opener
from tests.conftest import free_port
from tests.e2e.test_mesh import keygen
from tests.e2e.test_mesh_abuse import Peer, Target, wait_for


class UdpEcho:
    """Answers every datagram with ``echo:`` and the datagram, and counts what it received."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received = 0
        self.peers: set[tuple[str, int]] = set()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
                self.received += 1
                self.peers.add(peer)
                self.sock.sendto(b"echo:" + data, peer)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[UdpEcho]:
    server = UdpEcho()
    yield server
    server.close()


def start_b(start_gate: Any, tmp_path: Path, echo: UdpEcho, **top: Any) -> Target:
    """Gate B: an h2 listener whose peer ``a`` may reach the echo server's port only."""
    keygen(tmp_path / "a")
    keygen(tmp_path / "b")
    port = free_port()
    gate = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{port}"}],
        routes=[{"action": "direct", "name": "out"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"),
                "allow": [{"dst": ["127.0.0.1/32"], "port": [echo.port]}]}],
        **top,
    )
    return Target(gate, port, tmp_path / "a")


@pytest.fixture
def gate_b(start_gate: Any, tmp_path: Path, echo: UdpEcho) -> Target:
    return start_b(start_gate, tmp_path, echo)


def records(gate: Any) -> list[dict[str, Any]]:
    path = Path(gate.config["log"]["access"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gate_a(tmp_path: Path, b_port: int) -> tuple[Opener, Mesh]:
    """Gate A in this process: routes everything via b, as its UDP listeners would."""
    config = parse_config({
        "listeners": [{"name": "u", "kind": "socks5", "listen": "127.0.0.1:1"}],
        "routes": [{"via": "b", "name": "to-b"}],
        "mesh": {"identity": str(tmp_path / "a")},
        "peers": [{"name": "b", "address": f"127.0.0.1:{b_port}", "cert": str(tmp_path / "b" / "cert.pem")}],
    })
    assert config.mesh is not None
    mesh = Mesh(Trust(config.mesh, config.peers))
    ctx = Context(Router(config.routes), AccessLog(str(tmp_path / "access-a.log")), mesh=mesh)
    return Opener(ctx, "u", 5.0), mesh


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_datagrams_cross_the_mesh_and_b_logs_the_inner_flow(gate_b: Target, echo: UdpEcho,
                                                              tmp_path: Path) -> None:
    answers: list[tuple[Endpoint, bytes]] = []
    dst = Endpoint("127.0.0.1", echo.port)

    async def scenario() -> None:
        opener, mesh = gate_a(tmp_path, gate_b.port)
        flow = Flow(listener="u", client=Endpoint("127.0.0.1", 40000), dst=dst, path="udp")
        via = opener.open_udp(opener.decide(flow), flow)
        assert isinstance(via, ViaUdp) and flow.peer == "b"
        ended: list[GateError | None] = []
        via.on_datagram = lambda remote, payload: answers.append((remote, payload))
        via.on_end = ended.append
        # the first ones queue while the tunnel and the stream are set up, up to MAX_QUEUED_BYTES
        queued = sum(via.send(dst, f"d{i:03}".encode() + bytes(1200)) for i in range(100))
        assert queued == MAX_QUEUED_BYTES // 1204 and via.dropped == 100 - queued
        await until(lambda: len(answers) >= queued)
        for i in range(100, 300):
            assert via.send(dst, f"d{i:03}".encode() + bytes(1200))
            if i % 20 == 0:
                await asyncio.sleep(0.001)  # UDP all the way: a burst could overflow the echo's buffer
        await until(lambda: len(answers) >= queued + 150)
        assert via.send(dst, b"big" + bytes(60000))  # one capsule across several DATA frames
        await until(lambda: any(p.startswith(b"echo:big") for _, p in answers))
        via.close()
        await asyncio.sleep(0.2)  # B ends its side on our END_STREAM
        assert not ended
        mesh.close()

    asyncio.run(scenario())
    assert {remote for remote, _ in answers} == {dst}  # from the destination the client sent to
    echoed = [p for _, p in answers if p.startswith(b"echo:d")]
    assert len({p[5:9] for p in echoed}) >= 150 + MAX_QUEUED_BYTES // 1204
    assert all(len(p) == 5 + 4 + 1200 for p in echoed)
    assert len({p for _, p in echo.peers}) == 1  # one stream, one socket on B
    assert wait_for(lambda: any(r.get("path") == "udp" for r in records(gate_b.gate)))
    (record,) = [r for r in records(gate_b.gate) if r.get("path") == "udp"]
    assert record["dst"] == str(dst) and record["listener"] == "mesh" and record["close"] == "eof"
    assert record["bytes_up"] >= 150 * 1204 and record["bytes_down"] >= 150 * 1209
    assert record["client"] == "127.0.0.1:40000"


def test_the_allow_list_refuses_a_destination_and_the_session_ends(gate_b: Target, echo: UdpEcho,
                                                                     tmp_path: Path) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    dst = Endpoint("127.0.0.1", closed.getsockname()[1])  # not in a's allow list on B
    ended: list[GateError | None] = []

    async def scenario() -> None:
        opener, mesh = gate_a(tmp_path, gate_b.port)
        flow = Flow(listener="u", client=Endpoint("127.0.0.1", 40000), dst=dst, path="udp")
        via = opener.open_udp(opener.decide(flow), flow)
        assert isinstance(via, ViaUdp)
        via.on_end = ended.append
        via.send(dst, b"hello")
        await until(lambda: bool(ended))
        assert via.closed and not via.send(dst, b"again")
        mesh.close()

    asyncio.run(scenario())
    closed.close()
    assert isinstance(ended[0], RejectedByRule) and "403" in str(ended[0])
    assert wait_for(lambda: any(r["close"] == "rejected" for r in records(gate_b.gate)))
    (record,) = records(gate_b.gate)
    assert record["dst"] == str(dst) and "may not reach" in record["detail"] and record["path"] == "udp"


def test_a_quiet_stream_ends_cleanly_and_the_next_datagram_opens_another(start_gate: Any, tmp_path: Path,
                                                                        echo: UdpEcho) -> None:
    b = start_b(start_gate, tmp_path, echo, timeouts={"handshake": 5, "connect": 5, "idle": 1, "drain": 2})
    dst = Endpoint("127.0.0.1", echo.port)
    answers: list[bytes] = []
    ended: list[GateError | None] = []

    async def scenario() -> None:
        opener, mesh = gate_a(tmp_path, b.port)
        flow = Flow(listener="u", client=Endpoint("127.0.0.1", 40000), dst=dst, path="udp")
        via = opener.open_udp(opener.decide(flow), flow)
        assert isinstance(via, ViaUdp)
        via.on_datagram = lambda remote, payload: answers.append(payload)
        via.on_end = ended.append
        via.send(dst, b"one")
        await until(lambda: answers == [b"echo:one"])
        await until(lambda: not via.streams, timeout=4)  # B's idle timeout ended it, cleanly
        assert via.send(dst, b"two")
        await until(lambda: answers == [b"echo:one", b"echo:two"])
        mesh.close()  # the tunnel goes: the open stream breaks, and the session with it
        await until(lambda: bool(ended))

    asyncio.run(scenario())
    assert len(ended) == 1 and ended[0] is not None and "via b" in str(ended[0])
    assert wait_for(lambda: len(records(b.gate)) == 2)
    first, second = records(b.gate)
    assert first["close"] == "idle timeout" and first["bytes_up"] == 3 and first["bytes_down"] == 8
    assert second["close"] == "client reset" and second["bytes_up"] == 3


def udp_connect(peer: Peer, port: int, host: str = "127.0.0.1") -> int:
    stream_id = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(stream_id, [
        (":method", "CONNECT"), (":protocol", "connect-udp"), (":scheme", "https"), (":authority", "b"),
        (":path", f"/.well-known/masque/udp/{host}/{port}/"), ("capsule-protocol", "?1"),
        ("ugate-client", "127.0.0.1:5555"), ("ugate-hops", "1")])
    peer.flush()
    return stream_id


def test_b_advertises_extended_connect_and_skips_unknown_capsules(gate_b: Target, echo: UdpEcho) -> None:
    peer = Peer(gate_b)
    try:
        settings = peer.wait(h2.events.RemoteSettingsChanged)
        assert settings.changed_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL].new_value == 1
        stream_id = udp_connect(peer, echo.port)
        response = peer.wait(h2.events.ResponseReceived, stream_id=stream_id)
        headers = dict(response.headers)
        assert headers[b":status"] == b"200" and headers[b"capsule-protocol"] == b"?1"
        unknown = encode_varint(0x2A) + encode_varint(3) + b"xyz"  # an unknown capsule type: skipped
        other_context = b"\x00" + encode_varint(2) + b"\x02z"  # DATAGRAM, context id 2: dropped
        wire = unknown + other_context + datagram_capsule(b"ping")
        for i in range(len(wire)):  # one byte per DATA frame: capsules cut anywhere
            peer.conn.send_data(stream_id, wire[i:i + 1])
        peer.flush()
        reader, got = CapsuleReader(), []
        while not got:
            got = reader.feed(peer.wait(h2.events.DataReceived, stream_id=stream_id).data)
        assert got == [b"echo:ping"]
        assert echo.received == 1
    finally:
        peer.close()


@pytest.mark.parametrize("bad", [
    encode_varint(0) + encode_varint(1 << 20) + b"x",  # a DATAGRAM capsule longer than MAX_CAPSULE
    encode_varint(0x33) + encode_varint(1 << 40),  # an unknown type, absurd length
    encode_varint(0) + encode_varint(0),  # a DATAGRAM without its context id
], ids=["oversized", "huge-unknown", "no-context"])
def test_a_bad_capsule_resets_its_stream_and_b_serves_on(gate_b: Target, echo: UdpEcho, bad: bytes) -> None:
    peer = Peer(gate_b)
    try:
        stream_id = udp_connect(peer, echo.port)
        peer.wait(h2.events.ResponseReceived, stream_id=stream_id)
        peer.conn.send_data(stream_id, bad)
        peer.flush()
        reset = peer.wait(h2.events.StreamReset, stream_id=stream_id)
        assert reset.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        again = udp_connect(peer, echo.port)  # the same connection serves on
        peer.wait(h2.events.ResponseReceived, stream_id=again)
        peer.conn.send_data(again, datagram_capsule(b"ok"))
        peer.flush()
        assert CapsuleReader().feed(peer.wait(h2.events.DataReceived, stream_id=again).data) == [b"echo:ok"]
    finally:
        peer.close()
    gate_b.gate.stop()
    assert "Traceback" not in gate_b.gate.stderr()
    assert any(r["path"] == "udp" and "bad capsule" in (r["detail"] or "") for r in records(gate_b.gate))


class OldPeer:
    """A real HTTP/2 server over TLS with gate b's certificate that does not announce extended CONNECT
    (a gate from before CONNECT-UDP): it answers nothing and records the requests it gets."""

    def __init__(self, certs: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.set_alpn_protocols(["h2"])
        self.ctx.load_cert_chain(certs / "cert.pem", certs / "key.pem")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.requests: list[Any] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            raw, _ = self.listener.accept()
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
                conn.initiate_connection()
                tls.sendall(conn.data_to_send())
                while data := tls.recv(65536):
                    self.requests += [e for e in conn.receive_data(data) if isinstance(e, h2.events.RequestReceived)]
                    tls.sendall(conn.data_to_send())
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self.listener.close()


def test_a_peer_that_does_not_announce_extended_connect_gets_no_connect_udp(tmp_path: Path) -> None:
    keygen(tmp_path / "a")
    keygen(tmp_path / "b")
    old = OldPeer(tmp_path / "b")
    ended: list[GateError | None] = []

    async def scenario() -> None:
        opener, mesh = gate_a(tmp_path, old.port)
        dst = Endpoint("127.0.0.1", 9)
        flow = Flow(listener="u", client=Endpoint("127.0.0.1", 40000), dst=dst, path="udp")
        via = opener.open_udp(opener.decide(flow), flow)
        assert isinstance(via, ViaUdp)
        via.on_end = ended.append
        via.send(dst, b"hello")
        await until(lambda: bool(ended))
        mesh.close()

    try:
        asyncio.run(scenario())
    finally:
        old.close()
    assert isinstance(ended[0], UpstreamUnreachable) and "does not accept CONNECT-UDP" in str(ended[0])
    assert old.requests == []  # h2 would have sent it anyway
