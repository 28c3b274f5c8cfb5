"""Relayed signaling on one host: gate A sends its offer for gate C to gate B (A's tunnel to B), B passes
it on over C's reverse tunnel vouching for A, and C answers through B; flows ``via: c`` then cross a
data channel between A and C. Refused when B's relay permission is missing, when A names a gate B does
not know, and when C's entry for A does not name B as its ``via_gate``: the flows then go over HTTP/2
through B (B's route ``via: c``), at once rather than after the ICE timeout.

(The NAT version, with B's byte counters and UDP blocked: test_webrtc_relay_netns.)
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.e2e.test_mesh import keygen
from tests.e2e.test_webrtc import upload


def three_gates(start_gate: Any, tmp_path: Path, hash_echo: int, relay: tuple[str, ...] = ("c",),
                a_names_c: str = "c", c_knows_a_via: str | None = "b") -> dict[str, Any]:
    """B: h2 listener, relays A's signaling to C (``relay``), routes A's h2 flows on ``via: c``. C keeps a
    reverse tunnel to B and knows A ``via_gate: c_knows_a_via``. A: a forward listener to the hash echo
    routed ``via: c``, C known ``via_gate: b`` by the certificate of ``a_names_c``."""
    id_b = keygen(tmp_path / "b")
    ids = {name: keygen(tmp_path / name) for name in ("a", "c", "x")}
    h2_port, fwd = free_port(), free_port()
    allow = [{"dst": ["127.0.0.1/32"], "port": [hash_echo]}]
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2_port}"}],
        routes=[{"match": {"listener": ["mesh"]}, "via": "c", "name": "a-to-c"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "relay": list(relay), "allow": allow},
               {"name": "c", "cert": str(tmp_path / "c" / "cert.pem")}],
    )
    a_on_c: dict[str, Any] = {"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "transports": ["webrtc", "h2"],
                              "allow": allow}
    if c_knows_a_via is not None:
        a_on_c["via_gate"] = c_knows_a_via
    c = start_gate([], mesh={"identity": str(tmp_path / "c")},
                   peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b, "reverse": True,
                           "allow": allow}, a_on_c])
    a = start_gate(
        [{"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{fwd}", "to": f"127.0.0.1:{hash_echo}"}],
        routes=[{"via": "c", "name": "to-c"}],
        mesh={"identity": str(tmp_path / "a")},
        peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b},
               {"name": "c", "cert": str(tmp_path / a_names_c / "cert.pem"), "via_gate": "b",
                "transports": ["webrtc", "h2"]}],
    )
    deadline = time.monotonic() + 15
    while "reverse tunnel from gate c (" not in b.stderr():
        assert time.monotonic() < deadline, b.stderr()[-2000:]
        time.sleep(0.05)
    return {"a": a, "b": b, "c": c, "fwd": fwd, "ids": ids}


def _through_a(gates: dict[str, Any], size: int) -> None:
    blob = os.urandom(size)
    assert upload(gates["fwd"], blob).decode() == f"{hashlib.sha256(blob).hexdigest()} {size}", \
        gates["a"].stderr()[-3000:]


def test_signaling_relayed_by_b_connects_a_and_c_directly(start_gate: Any, tmp_path: Path, hash_echo: int) -> None:
    gates = three_gates(start_gate, tmp_path, hash_echo)
    _through_a(gates, 2 << 20)
    assert [(r["listener"], r["path"], r["bytes_up"]) for r in gates["c"].wait_records(1)] == [
        ("b", "webrtc", 2 << 20)]  # (the listener: the tunnel the offer came over)
    assert gates["b"].records() == []
    assert "relayed a webrtc exchange from a to c" in gates["b"].stderr()
    assert "webrtc: connected to c" in gates["a"].stderr()


def _refused(gates: dict[str, Any]) -> None:
    """The flow went over HTTP/2 through B, on B's refusal (a 403), not after the ICE timeout."""
    assert [(r["listener"], r["path"]) for r in gates["c"].wait_records(1)] == [("b", "h2")]
    assert [(r["listener"], r["action"], r["peer"]) for r in gates["b"].wait_records(1)] == [("mesh", "via", "c")]
    assert "falls back to h2" in gates["a"].stderr() and "not connected" not in gates["a"].stderr()
    assert "webrtc to c: via b: 403 rejected" in gates["a"].stderr()
    assert "relayed a webrtc exchange" not in gates["b"].stderr()


def test_refused_without_the_relay_permission(start_gate: Any, tmp_path: Path, hash_echo: int) -> None:
    gates = three_gates(start_gate, tmp_path, hash_echo, relay=())
    _through_a(gates, 1 << 20)
    _refused(gates)
    assert "not relayed: peer a may not signal to c through us" in gates["b"].stderr()
    assert "answered an offer" not in gates["c"].stderr()


def test_refused_for_a_target_b_does_not_know(start_gate: Any, tmp_path: Path, hash_echo: int) -> None:
    gates = three_gates(start_gate, tmp_path, hash_echo, a_names_c="x")  # A holds gate x's cert for c
    _through_a(gates, 1 << 20)
    _refused(gates)
    assert f"not relayed: no peer here has gate ID {gates['ids']['x']}" in gates["b"].stderr()


def test_c_refuses_an_offer_relayed_by_a_gate_it_does_not_name(start_gate: Any, tmp_path: Path,
                                                              hash_echo: int) -> None:
    gates = three_gates(start_gate, tmp_path, hash_echo, c_knows_a_via=None)  # C takes A's offers direct only
    _through_a(gates, 1 << 20)
    assert [(r["listener"], r["path"]) for r in gates["c"].wait_records(1)] == [("b", "h2")]
    assert "falls back to h2" in gates["a"].stderr()
    assert "may not relay offers from gate" in gates["c"].stderr()
    assert "answered an offer" not in gates["c"].stderr()
