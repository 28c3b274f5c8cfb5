"""UDP over WebRTC across namespaces: client -> gate A (gateway namespace, tproxy_udp capture, routes
via b, transports [webrtc, h2]) -> unordered data channels -> gate B (server namespace) -> dnsmasq and
iperf3 in the server namespace. Real clients: dig (IPv4 and IPv6) and iperf3 -u."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.e2e.test_capture import gateway_config, spawn, wait_listening
from tests.e2e.test_mesh import keygen

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
PREFIX = f"ugru{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def topo() -> Iterator[netns.Topology]:
    netns.remove(PREFIX)
    topology = netns.router(PREFIX)
    a = topology.addr
    dns = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--user=root", "--bind-interfaces",
           f"--listen-address={a['server4']},{a['server6']}", "--address=/test.example/10.1.2.3", "--pid-file="]
    servers = []
    try:
        servers += [spawn(topology, "server", "iperf3", "-s", "-p", "5201"), spawn(topology, "server", *dns)]
        wait_listening(topology, "server", 5201)
        yield topology
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()
        topology.remove()


def test_dig_and_iperf3_cross_unordered_channels_and_b_refuses_what_a_may_not_reach(
        start_gate: Any, topo: netns.Topology, tmp_path: Path) -> None:
    a = topo.addr
    keygen(tmp_path / "a")
    id_b = keygen(tmp_path / "b")
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"{a['server4']}:15008"}],
        netns=topo.ns["server"], mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "transports": ["webrtc", "h2"],
                "allow": [{"dst": [f"{a['server4']}/32", f"{a['server6']}/128"], "port": [53, 5201]}]}],
    )
    listeners, capture = gateway_config("tproxy", udp=True)
    gate_a = start_gate(listeners, routes=[{"via": "b", "name": "to-b"}], netns=topo.ns["gateway"],
                        capture=capture, mesh={"identity": str(tmp_path / "a")},
                        peers=[{"name": "b", "address": f"{a['server4']}:15008", "id": id_b,
                                "transports": ["webrtc", "h2"]}])
    for server in (a["server4"], a["server6"]):
        # the first query waits for the peer connection (ICE, DTLS, SCTP): dig retries
        got = topo.run("client", "dig", f"@{server}", "test.example", "+short", "+tries=3", "+time=3")
        assert got.strip() == "10.1.2.3", gate_a.stderr()[-3000:]
    refused = subprocess.run(topo.cmd("client", "dig", "-p", "5353", f"@{a['server4']}", "test.example",
                                      "+tries=1", "+time=2"), capture_output=True, text=True)
    assert refused.returncode != 0  # B's allow list does not admit port 5353: no answer at all
    # 2 Mbit/s (~210 datagrams a second): well under what aiortc moves in 1,200-byte messages even on a
    # busy machine (about 1,000 a second quiet; 10 Mbit/s lost over half under a load average of 20)
    out = topo.run("client", "iperf3", "-c", a["server4"], "-u", "-b", "2M", "-l", "1200", "-t", "2", "-J")
    summary = json.loads(out)["end"]["sum"]
    assert summary["packets"] > 300 and summary["lost_percent"] < 10, summary
    gate_a.stop()
    assert b.stop() == 0
    assert "Traceback" not in gate_a.stderr() + b.stderr()
    assert "webrtc: connected to b" in gate_a.stderr() and "falls back" not in gate_a.stderr()
    mine = [r for r in gate_a.records() if r.get("path") == "udp"]
    theirs = [r for r in b.records() if r.get("path") == "webrtc-udp"]
    assert not [r for r in b.records() if r.get("path") == "udp"]  # nothing went as CONNECT-UDP
    dns = [r for r in mine if r["dst"] in (f"{a['server4']}:53", f"[{a['server6']}]:53")]
    assert len(dns) == 2 and all(r["protocol"] == "dns" and r["peer"] == "b" and r["bytes_down"] > 0 for r in dns)
    assert any(r["close"] == "rejected" and r["dst"].endswith(":5353") for r in mine), mine
    assert {r["dst"] for r in theirs if r["close"] != "rejected"} >= {
        f"{a['server4']}:53", f"[{a['server6']}]:53", f"{a['server4']}:5201"}
    (no,) = [r for r in theirs if r["close"] == "rejected"]
    assert no["dst"] == f"{a['server4']}:5353" and "may not reach" in no["detail"]
    (bulk,) = [r for r in theirs if r["dst"] == f"{a['server4']}:5201"]
    assert bulk["bytes_up"] >= summary["packets"] * 1200 * 0.9
