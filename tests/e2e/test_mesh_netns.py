"""The mesh across namespaces: client -> gate A (tproxy capture and socks5, in the gateway namespace)
-> HTTP/2 over mutual TLS -> gate B (in the server namespace) -> servers. IPv4 and IPv6, curl and iperf3."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_capture import IPERF_COOKIE, WEB, curl, gateway_config, router  # noqa: F401 (fixture)
from tests.e2e.test_mesh import keygen
from tproxy import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_captured_and_socks_flows_cross_the_mesh(start_gate: Any, router: netns.Topology,  # noqa: F811
                                                  tmp_path: Path) -> None:
    a = router.addr
    keygen(tmp_path / "a")
    id_b = keygen(tmp_path / "b")
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"{a['server4']}:15008"}],
        netns=router.ns["server"], mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"),
                "allow": [{"dst": [f"{a['server4']}/32", f"{a['server6']}/128"], "port": [WEB, 5201]}]}],
    )
    listeners, capture = gateway_config("tproxy")
    listeners.append({"name": "socks", "kind": "socks5", "listen": f"{a['gateway_lan4']}:1080"})
    gate_a = start_gate(listeners, routes=[{"via": "b", "name": "to-b"}], netns=router.ns["gateway"],
                        capture=capture, mesh={"identity": str(tmp_path / "a")},
                        peers=[{"name": "b", "address": f"{a['server4']}:15008", "id": id_b}])
    # B dials the servers from its own namespace: they see B's address, not the client's
    for server, seen in ((a["server4"], a["server4"]), (f"[{a['server6']}]", a["server6"])):
        got = curl(router, "client", f"http://{server}:{WEB}/")
        assert got.returncode == 0, got.stderr + gate_a.stderr()[-2000:]
        assert got.stdout == f"you are {seen}\n"
    got = curl(router, "client", f"http://{a['server4']}:{WEB}/", "-x", f"socks5h://{a['gateway_lan4']}:1080")
    assert got.stdout == f"you are {a['server4']}\n", got.stderr
    out = router.run("client", "iperf3", "-c", a["server4"], "-n", "100M", "-J")
    end = json.loads(out)["end"]
    sent, received = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
    assert sent >= 100 * 2**20 and received > 0
    gate_a.stop()
    records = gate_a.records()
    assert {r["action"] for r in records} == {"via"} and {r["listener"] for r in records} >= {"tproxy4", "tproxy6",
                                                                                             "socks"}
    (bulk,) = [r for r in records if r["bytes_up"] > 2**20]
    assert received + IPERF_COOKIE <= bulk["bytes_up"] <= sent + IPERF_COOKIE
    assert gate_a.stderr().count("mesh: tunnel to b (") == 1  # every flow rode the one connection
    assert b.stop() == 0
    assert {r["dst"] for r in b.records()} >= {f"{a['server4']}:{WEB}", f"[{a['server6']}]:{WEB}",
                                               f"{a['server4']}:5201"}
