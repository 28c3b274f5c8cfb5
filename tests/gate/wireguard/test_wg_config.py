"""The ``wireguard:`` section: a good one becomes a frozen spec; every problem is located."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gate.addr import Endpoint
from gate.config import parse_config
from gate.errors import ConfigError
from gate.wg_spec import WgMode, WgPeerSpec
from tests.conftest import ROOT

GATE_ID = "73tlqhtrwjbvyqqp55i7keo2tw4l7vjbq6o2dg5xdpkbcghostaq"
OTHER_ID = "pgbjsmjxg33wpowfhwyops6fsqm54xfbxn7emmb57a7orcq4t5oq"


def config(wireguard: Any, **top: Any) -> dict[str, Any]:
    return {"listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1080"}],
            "mesh": {"identity": "/nonexistent", "stun": ["198.51.100.1:3478"]},
            "peers": [{"name": "hub", "address": "198.51.100.1:8443", "id": GATE_ID}],
            "wireguard": wireguard, **top}


def problems(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return e.value.problems


def test_a_site_gate() -> None:
    spec = parse_config(config({"interface": "wg0", "peers": [
        {"gate": OTHER_ID, "via": "hub", "ice_port": 51900, "allowed_ips": ["10.99.0.2/32"]}]})).wireguard
    assert spec is not None
    assert (spec.interface, spec.mode, spec.listen_port, spec.relay) == ("wg0", WgMode.NFTABLES, None, False)
    assert spec.stun == (Endpoint("198.51.100.1", 3478),)  # mesh.stun unless given
    assert spec.peers == (WgPeerSpec(gate=OTHER_ID, via="hub", ice_port=51900, keepalive=25,
                                     allowed_ips=(ipaddress.ip_network("10.99.0.2/32"),)),)


def test_a_relay_needs_no_interface() -> None:
    spec = parse_config(config({"relay": True})).wireguard
    assert spec is not None and spec.relay and spec.interface is None and spec.peers == ()


def test_every_problem_is_located() -> None:
    found = problems(config({"interface": "a-name-far-too-long", "mode": "raw", "listen_port": 51900, "peers": [
        {"gate": "REPLACE-ME", "via": "nobody", "ice_port": 51900, "allowed_ips": ["10.0.0.300"]},
        {"gate": OTHER_ID, "via": "hub", "ice_port": 70000, "allowed_ips": []},
        {"via": "hub", "ice_port": 51901, "allowed_ips": ["10.0.0.1"], "colour": "red"},
    ]}, workers=2))
    assert found == [
        "wireguard: needs workers: 1 (one ICE agent per peer and port; 2 workers would each run one)",
        "wireguard.interface: 'a-name-far-too-long' is not an interface name (1-15 characters, no '/' or spaces)",
        "wireguard.mode: raw is not built yet (built: nftables, proxy)",
        "wireguard.peers[0].via: 'nobody' is not a peers: entry (the gate whose mesh tunnel carries the signalling)",
        "wireguard.peers[0].allowed_ips: '10.0.0.300' is not an IP address or CIDR",
        "wireguard.peers[0].gate: 'REPLACE-ME' is not a gate ID (52 lower-case base32 characters, as ugate keygen "
        "prints)",
        "wireguard.peers[0].ice_port: 51900 is the interface's listen_port (ICE needs its own)",
        "wireguard.peers[1].allowed_ips: empty: the peer could send nothing through the tunnel",
        "wireguard.peers[1].ice_port: 70000 is not a port",
        "wireguard.peers[2].colour: unknown key (expected one of: gate, via, allowed_ips, ice_port, keepalive)",
        "wireguard.peers[2].gate: missing",
    ]


def test_two_peers_on_one_port_and_one_gate_twice() -> None:
    peer = {"gate": OTHER_ID, "via": "hub", "ice_port": 51900, "allowed_ips": ["10.99.0.2/32"]}
    assert problems(config({"interface": "wg0", "peers": [peer, peer]})) == [
        "wireguard.peers[1].gate: is listed twice",
        "wireguard.peers[1].ice_port: 51900 is used by another peer (one ICE agent per port)",
    ]


def test_needs_a_mesh_and_an_interface_or_relay() -> None:
    assert problems({"listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1080"}],
                     "wireguard": {}}) == [
        "wireguard: needs a mesh: section (peers are gates, and the signalling travels over the mesh)",
        "wireguard.interface: missing (or relay: true for a gate that only forwards signalling)",
    ]


def test_ugate_check_and_rules_show(tmp_path: Path) -> None:
    """``ugate check`` lists the section's problems located; ``rules show`` prints mode 3's rules."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config({"interface": "wg0", "mode": "iptables", "listen_port": 51820, "peers": [
        {"gate": OTHER_ID, "via": "nobody", "ice_port": 51900, "allowed_ips": ["10.99.0.2/32"]}]})))
    done = subprocess.run([sys.executable, "-m", "gate", "check", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "wireguard.mode: iptables is not built yet (built: nftables, proxy)" in done.stderr
    assert "wireguard.peers[0].via: 'nobody' is not a peers: entry" in done.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config({"interface": "wg0", "listen_port": 51820, "peers": [
        {"gate": OTHER_ID, "via": "hub", "ice_port": 51900, "allowed_ips": ["10.99.0.2/32"]}]})))
    shown = subprocess.run([sys.executable, "-m", "gate", "rules", "show", "--config", str(good)], cwd=ROOT,
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("# nftables, wireguard mode 3")
    assert "udp dport 51900 @th,96,32 != 0x2112a442 counter notrack udp dport set 51820" in shown.stdout
