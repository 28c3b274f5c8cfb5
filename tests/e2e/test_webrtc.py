"""Gate to gate over WebRTC data channels (aiortc), signalled over the HTTP/2 mTLS mesh:
client -> gate A (socks5, forward) -> data channel -> gate B -> server, with fallback to HTTP/2.

On the machine's own namespace: ICE uses the host candidates of its interfaces (aioice leaves out
loopback), so both gates reach each other at this machine's own address.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PAYLOAD, curl, free_port
from tests.e2e.test_mesh import keygen, socks5_reply


def gates(start_gate: Any, tmp_path: Path, http_origin: int, hash_echo: int, a_transports: list[str],
          b_transports: list[str]) -> dict[str, Any]:
    """Gate B serves h2 (and answers WebRTC offers from A when ``b_transports`` lists webrtc); gate A
    sends everything via B, over the transports ``a_transports``."""
    id_a, id_b = keygen(tmp_path / "a"), keygen(tmp_path / "b")
    h2_port, socks, fwd = free_port(), free_port(), free_port()
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2_port}"}],
        routes=[{"match": {"port": [1]}, "action": "reject", "name": "closed"}, {"action": "direct", "name": "out"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "transports": b_transports,
                "allow": [{"dst": ["127.0.0.1/32"], "port": [http_origin, hash_echo, 1, 9]}]}],
    )
    a = start_gate(
        [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"},
         {"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{fwd}", "to": f"127.0.0.1:{hash_echo}"}],
        routes=[{"via": "b", "name": "to-b"}],
        mesh={"identity": str(tmp_path / "a")},
        peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b, "transports": a_transports}],
    )
    return {"a": a, "b": b, "socks": socks, "fwd": fwd, "id_a": id_a, "id_b": id_b, "h2": h2_port}


@pytest.fixture
def webrtc_gates(start_gate: Any, tmp_path: Path, http_origin: int, hash_echo: int) -> dict[str, Any]:
    return gates(start_gate, tmp_path, http_origin, hash_echo, ["webrtc", "h2"], ["webrtc", "h2"])


def upload(port: int, blob: bytes) -> bytes:
    """Send ``blob`` then half-close; the hash-echo server answers its hash after our FIN."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(blob)
        s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b""))


def test_flows_cross_a_data_channel_byte_exact_both_ways(webrtc_gates: dict[str, Any], http_origin: int) -> None:
    a, b, socks, fwd = webrtc_gates["a"], webrtc_gates["b"], webrtc_gates["socks"], webrtc_gates["fwd"]
    got = curl("-x", f"socks5h://127.0.0.1:{socks}", f"http://127.0.0.1:{http_origin}/payload")
    assert got.returncode == 0 and hashlib.sha256(got.stdout).digest() == hashlib.sha256(PAYLOAD).digest()
    blob = os.urandom(6 << 20)
    assert upload(fwd, blob).decode() == f"{hashlib.sha256(blob).hexdigest()} {len(blob)}"  # and half-close
    b_records = b.wait_records(2)
    assert [r["path"] for r in b_records] == ["webrtc", "webrtc"], b_records
    assert sorted(r["bytes_up"] for r in b_records)[-1] == len(blob)
    assert max(r["bytes_down"] for r in b_records) > len(PAYLOAD)
    assert [r["action"] for r in a.wait_records(2)] == ["via", "via"]
    assert a.stderr().count("webrtc: connected to b") == 1
    assert "falls back" not in a.stderr()


def test_refusals_map_to_socks_codes_over_webrtc(webrtc_gates: dict[str, Any]) -> None:
    socks = webrtc_gates["socks"]
    assert socks5_reply(socks, "127.0.0.1", 2) == 2  # outside B's allow list for A
    assert socks5_reply(socks, "127.0.0.1", 1) == 2  # allowed, then rejected by B's own route
    assert socks5_reply(socks, "127.0.0.1", 9) == 5  # nothing listens at B's side: refused
    records = webrtc_gates["b"].wait_records(3)
    reasons = sorted((r["close"], r["detail"]) for r in records)
    assert ("rejected", "peer a may not reach 127.0.0.1:2") in reasons, reasons
    assert ("rejected", "rejected by closed") in reasons, reasons
    assert "falls back" not in webrtc_gates["a"].stderr()


def test_a_peer_that_does_not_offer_webrtc_gets_the_flow_over_h2(start_gate: Any, tmp_path: Path,
                                                                  http_origin: int, hash_echo: int) -> None:
    g = gates(start_gate, tmp_path, http_origin, hash_echo, ["webrtc", "h2"], ["h2"])
    for _ in range(2):  # the second flow does not try WebRTC again yet (backoff)
        blob = os.urandom(1 << 20)
        assert upload(g["fwd"], blob).decode() == f"{hashlib.sha256(blob).hexdigest()} {len(blob)}"
    assert [r["path"] for r in g["b"].wait_records(2)] == ["h2", "h2"]
    assert g["a"].stderr().count("falls back to h2") == 1
    assert "via b: 403 rejected" in g["a"].stderr()  # B answers no exchanges: its h2 side refused the offer


def test_descriptors_return_to_baseline_and_gates_stop_cleanly(webrtc_gates: dict[str, Any],
                                                               http_origin: int) -> None:
    a, b, socks = webrtc_gates["a"], webrtc_gates["b"], webrtc_gates["socks"]
    url = f"http://127.0.0.1:{http_origin}/n"
    assert curl("-x", f"socks5h://127.0.0.1:{socks}", url).returncode == 0  # the peer connection is up
    a.wait_records(1)  # the first flow ended on both gates: its sockets are not in the baseline
    b.wait_records(1)
    baseline = a.fd_count(), b.fd_count()
    for i in range(20):
        got = curl("-x", f"socks5h://127.0.0.1:{socks}", f"{url}{i}").stdout
        assert got == f"hello from {http_origin} /n{i}\n".encode()
    assert len(b.wait_records(21)) == 21
    deadline = time.monotonic() + 5
    while (a.fd_count(), b.fd_count()) != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (a.fd_count(), b.fd_count()) == baseline
    assert a.stderr().count("webrtc: connected to b") == 1
    assert a.stop() == 0 and b.stop() == 0
    assert "Task was destroyed" not in a.stderr() + b.stderr()


def test_signaling_over_a_reverse_tunnel(start_gate: Any, tmp_path: Path, hash_echo: int) -> None:
    """C (behind NAT, no listener) keeps a reverse tunnel to B; B's flows via C go over WebRTC, the offer
    carried by that tunnel, and C serves them with its allow list for B."""
    id_b = keygen(tmp_path / "b")
    keygen(tmp_path / "c")
    h2_port, fwd = free_port(), free_port()
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2_port}"},
         {"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{fwd}", "to": f"127.0.0.1:{hash_echo}"}],
        routes=[{"via": "c"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "c", "cert": str(tmp_path / "c" / "cert.pem"), "transports": ["webrtc", "h2"]}],
    )
    c = start_gate(
        [], routes=[{"action": "direct"}],
        mesh={"identity": str(tmp_path / "c")},
        peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b, "reverse": True,
                "transports": ["webrtc", "h2"], "allow": [{"dst": ["127.0.0.1/32"], "port": [hash_echo]}]}],
    )
    blob = os.urandom(2 << 20)
    assert upload(fwd, blob).decode() == f"{hashlib.sha256(blob).hexdigest()} {len(blob)}"
    records = c.wait_records(1)
    assert [(r["listener"], r["path"]) for r in records] == [("b", "webrtc")], records
    assert "webrtc: connected to c" in b.stderr() and "falls back" not in b.stderr()


def test_a_peer_that_restarted_is_reached_again(webrtc_gates: dict[str, Any], start_gate: Any,
                                                hash_echo: int) -> None:
    """B dies without a word (SIGKILL) and comes back: A's peer connection does not know; the next flow
    finds its channel unacknowledged, falls back to HTTP/2 in time, and the one after is over WebRTC again."""
    a, b, fwd = webrtc_gates["a"], webrtc_gates["b"], webrtc_gates["fwd"]
    blob = os.urandom(1 << 20)
    expected = f"{hashlib.sha256(blob).hexdigest()} {len(blob)}"
    assert upload(fwd, blob).decode() == expected
    b.proc.kill()
    b.proc.wait()
    config = b.config
    b2 = start_gate(config["listeners"], routes=config["routes"], mesh=config["mesh"], peers=config["peers"])
    assert upload(fwd, blob).decode() == expected
    assert upload(fwd, blob).decode() == expected
    assert [r["path"] for r in b2.wait_records(2)] == ["h2", "webrtc"]
    assert "the connection does not answer" in a.stderr()
