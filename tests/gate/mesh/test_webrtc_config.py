"""Peer ``transports:`` in the config: parsed, validated with located problems, and seen by ugate check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gate.config import parse_config
from tests.e2e.test_mesh import keygen
from tests.gate.test_cli import ugate
from tests.gate.test_config import GATE_ID, problems


def _config(transports: Any) -> dict[str, Any]:
    peer: dict[str, Any] = {"name": "b", "address": "10.0.0.2:15008", "id": GATE_ID}
    if transports is not None:
        peer["transports"] = transports
    return {"mesh": {"identity": "/etc/ugate/id"}, "peers": [peer],
            "listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1080"}],
            "routes": [{"via": "b"}]}


def test_transports_default_to_h2_and_take_the_supported_orders() -> None:
    assert parse_config(_config(None)).peers[0].transports == ("h2",)
    for order in (["webrtc", "h2"], ["webrtc"], ["h2"]):
        assert parse_config(_config(order)).peers[0].transports == tuple(order)


def test_other_transports_are_located_problems() -> None:
    for bad in (["h2", "webrtc"], ["quic"], [], ["webrtc", "webrtc"]):
        found = problems(_config(bad))
        assert len(found) == 1 and found[0].startswith(f"peers[0].transports: {bad} is not supported"), found
    assert problems(_config("webrtc")) == ["peers[0].transports: expected a list of transports: [webrtc, h2], "
                                           "[webrtc] or [h2]"]


def test_ugate_check_loads_a_webrtc_peer(tmp_path: Path) -> None:
    keygen(tmp_path / "id")
    config = _config(["webrtc", "h2"])
    config["mesh"]["identity"] = str(tmp_path / "id")
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump(config))
    assert ugate("check", "--config", str(path)).returncode == 0
    config["peers"][0]["transports"] = ["webrtc", "quic"]
    path.write_text(yaml.safe_dump(config))
    done = ugate("check", "--config", str(path))
    assert done.returncode == 2 and "peers[0].transports: ['webrtc', 'quic'] is not supported" in done.stderr


def test_stun_servers_are_a_list_of_endpoints() -> None:
    config = _config(["webrtc", "h2"])
    config["mesh"]["stun"] = ["203.0.113.5:3478", "[2001:db8::5]:3478"]
    assert [str(e) for e in parse_config(config).mesh.stun] == ["203.0.113.5:3478", "[2001:db8::5]:3478"]  # type: ignore[union-attr]
    assert parse_config(_config(["webrtc"])).mesh.stun == ()  # type: ignore[union-attr]  # none unasked
    config["mesh"]["stun"] = "203.0.113.5:3478"
    found = problems(config)
    assert len(found) == 1 and found[0].startswith("mesh.stun:"), found
