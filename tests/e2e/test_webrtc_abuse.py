"""WebRTC signaling from a trusted peer gone bad: a raw HTTP/2 client (the test, holding peer ``a``'s
certificate) sends exchanges to gate B by hand: garbage offers, a body past the bound, an unknown kind.
B answers each with a refusal or a reset, and still serves a well-behaved peer afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.events
import pytest

from gate.mesh.h2_exchange import MAX_BODY
from gate.mesh.webrtc.wire import decode_signal
from tests.conftest import free_port
from tests.e2e.test_mesh import keygen
from tests.e2e.test_mesh_abuse import Peer, Target, Upstream, serves_a_normal_flow


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


@pytest.fixture
def gate_b(start_gate: Any, tmp_path: Path, upstream: Upstream) -> Target:
    """Gate B offers peer ``a`` (the test) WebRTC and may let it reach the upstream."""
    keygen(tmp_path / "a")
    keygen(tmp_path / "b")
    port = free_port()
    gate = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{port}"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "transports": ["webrtc", "h2"],
                "allow": [{"dst": ["127.0.0.1/32"], "port": [upstream.port]}]}],
    )
    return Target(gate, port, tmp_path / "a")


def exchange(peer: Peer, body: bytes, kind: str = "webrtc") -> tuple[str, bytes | None]:
    """Status, and the answer body (None if B reset the stream)."""
    stream_id = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "exchange.ugate.invalid:1"),
                                       ("ugate-exchange", kind)])
    peer.flush()
    response = peer.wait(h2.events.ResponseReceived, stream_id=stream_id)
    status = dict(response.headers)[b":status"].decode()
    if status != "200":
        return status, None
    sent = 0
    while sent < len(body):  # as the windows admit
        window = min(peer.conn.local_flow_control_window(stream_id), peer.conn.max_outbound_frame_size)
        if window <= 0:
            peer.read(1.0)
            if any(isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id for e in peer.events):
                return status, None
            continue
        peer.conn.send_data(stream_id, body[sent:sent + window])
        sent += window
        peer.flush()
    peer.conn.end_stream(stream_id)
    peer.flush()
    answer = b""
    while True:
        event = next((e for e in peer.events if getattr(e, "stream_id", None) == stream_id), None)
        if event is None:
            peer.read(5.0)
            continue
        peer.events.remove(event)
        if isinstance(event, h2.events.DataReceived):
            answer += event.data
            peer.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            return status, answer
        elif isinstance(event, h2.events.StreamReset):
            return status, None


def test_garbage_and_oversized_signaling_is_refused_and_b_serves_on(gate_b: Target, upstream: Upstream) -> None:
    peer = Peer(gate_b)
    try:
        for garbage in (b"", b"\x00\xff" * 100, b'{"v": 1, "gate": "x", "sdp": "v=0"}', b"{" * 5000):
            status, answer = exchange(peer, garbage)
            assert status == "200" and answer is not None
            assert decode_signal(answer).error.startswith(("bad offer", "offer names gate")), answer
        assert exchange(peer, b"x" * (MAX_BODY + 1)) == ("200", None)  # past the bound: reset
        assert exchange(peer, b"{}", kind="other")[0] == "403"
    finally:
        peer.close()
    serves_a_normal_flow(gate_b, upstream)
    assert gate_b.gate.alive()
