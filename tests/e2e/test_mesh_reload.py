"""Reloading a gate's peers: a peer re-keyed (the other gate got a new identity) is trusted again after a
reload without a restart, a removed peer is no longer used, and an added one is dialled."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import curl, free_port
from tests.e2e.test_mesh import keygen


def _reload(gate: Any, **changes: Any) -> str:
    gate.config.update(changes)
    gate.stderr_path.with_suffix(".yaml").write_text(yaml.safe_dump(gate.config))
    before = gate.stderr().count("reloaded:") + gate.stderr().count("reload refused")
    gate.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while gate.stderr().count("reloaded:") + gate.stderr().count("reload refused") == before:
        assert time.monotonic() < deadline, gate.stderr()
        time.sleep(0.02)
    return [line for line in gate.stderr().splitlines() if "reloaded:" in line or "reload refused" in line][-1]


def test_peers_rekeyed_removed_and_added_by_reload(start_gate: Any, tmp_path: Path, http_origin: int) -> None:
    keygen(tmp_path / "a")
    id_b = keygen(tmp_path / "b")
    h2 = free_port()

    def gate_b(identity: str) -> Any:
        return start_gate([{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2}"}],
                          mesh={"identity": str(tmp_path / identity)},
                          peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"),
                                  "allow": [{"dst": ["127.0.0.1/32"], "port": [http_origin]}]}])

    b = gate_b("b")
    socks = free_port()
    peer_b = {"name": "b", "address": f"127.0.0.1:{h2}", "id": id_b}
    a = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"}],
                   routes=[{"via": "b", "name": "to-b"}], mesh={"identity": str(tmp_path / "a")}, peers=[peer_b])
    url = f"http://127.0.0.1:{http_origin}/m"

    def fetch() -> Any:
        return curl("-x", f"socks5h://127.0.0.1:{socks}", "--max-time", "10", url)

    assert fetch().stdout.endswith(b"/m\n")
    served_by_b = len(b.wait_records(1))
    assert served_by_b == 1

    # B gets a new identity (a key rotation): A refuses it until its config pins the new ID
    assert b.stop() == 0
    id_b2 = keygen(tmp_path / "b2")
    b2 = gate_b("b2")
    assert fetch().returncode != 0
    line = _reload(a, peers=[{**peer_b, "id": id_b2}])
    assert "peers +0 -0 ~1" in line
    assert fetch().stdout.endswith(b"/m\n") and len(b2.wait_records(1)) == 1

    # removed: flows go direct, B sees none of them
    line = _reload(a, peers=[], routes=[{"action": "direct", "name": "out"}])
    assert "peers +0 -1 ~0" in line
    assert fetch().stdout.endswith(b"/m\n")
    time.sleep(0.3)
    assert len(b2.records()) == 1

    # added again: dialled on the first flow that needs it
    line = _reload(a, peers=[{**peer_b, "id": id_b2}], routes=[{"via": "b", "name": "to-b"}])
    assert "peers +1 -0 ~0" in line
    assert fetch().stdout.endswith(b"/m\n") and len(b2.wait_records(2)) == 2

    # a reload naming a route via a peer that does not exist is refused; B is still used
    assert "reload refused" in _reload(a, routes=[{"via": "c", "name": "to-c"}])
    assert fetch().stdout.endswith(b"/m\n") and len(b2.wait_records(3)) == 3
    assert a.stop() == 0
