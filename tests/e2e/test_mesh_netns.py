"""The mesh across namespaces: client -> gate A (tproxy capture and socks5, in the gateway namespace)
-> HTTP/2 over mutual TLS -> gate B (in the server namespace) -> servers. IPv4 and IPv6, curl and iperf3."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.e2e.test_capture import (  # noqa: F401 (router is a fixture)
    IPERF_COOKIE,
    WEB,
    curl,
    gateway_config,
    router,
    spawn,
    wait_listening,
)
from tests.e2e.test_mesh import keygen

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


def test_reverse_tunnel_reaches_a_gate_behind_nat(start_gate: Any, tmp_path: Path) -> None:
    """Gate C sits in the client namespace behind the gateway's MASQUERADE, with no inbound path at
    all; its reverse tunnel to gate B (server namespace) is the only way in, and B's clients use it."""
    prefix = f"ugr{os.getpid() % 100000}"
    netns.remove(prefix)
    topo = netns.router(prefix)
    web = None
    try:
        topo.run("gateway", "nft", "-f", "-", input_text="""
table ip ugtest_nat {
  chain post {
    type nat hook postrouting priority 100
    oifname "wan0" masquerade
  }
}
table inet ugtest_fw {
  chain forward_in {
    type filter hook forward priority 0; policy drop
    ct state established,related accept
    iifname "lan0" accept
  }
}
""")
        a = topo.addr
        web = spawn(topo, "client", sys.executable, "-m", "tests.e2e.peer_server", "8081")
        wait_listening(topo, "client", 8081)
        blocked = curl(topo, "server", f"http://{a['client4']}:8081/", "--connect-timeout", "1")
        assert blocked.returncode != 0  # no way in from outside the NAT
        keygen(tmp_path / "c")
        id_b = keygen(tmp_path / "b")
        b = start_gate(
            [{"name": "mesh", "kind": "h2", "listen": f"{a['server4']}:15008"},
             {"name": "socks", "kind": "socks5", "listen": "127.0.0.1:1080"}],
            routes=[{"match": {"dst": [f"{a['client4']}/32"]}, "via": "c"}, {"action": "reject"}],
            netns=topo.ns["server"], mesh={"identity": str(tmp_path / "b")},
            peers=[{"name": "c", "cert": str(tmp_path / "c" / "cert.pem")}],
        )
        start_gate([], netns=topo.ns["client"], mesh={"identity": str(tmp_path / "c")},
                   peers=[{"name": "b", "address": f"{a['server4']}:15008", "id": id_b, "reverse": True,
                           "allow": [{"dst": [f"{a['client4']}/32"], "port": [8081]}]}])
        deadline = time.monotonic() + 10
        while "reverse tunnel from gate c" not in b.stderr():
            assert time.monotonic() < deadline, b.stderr()[-2000:]
            time.sleep(0.05)
        assert f"at {a['gateway_wan4']}:" in b.stderr()  # C's connection came through the NAT
        got = curl(topo, "server", f"http://{a['client4']}:8081/", "-x", "socks5h://127.0.0.1:1080")
        assert got.stdout == f"you are {a['client4']}\n", got.stderr + b.stderr()[-2000:]
    finally:
        if web is not None:
            web.terminate()
            web.wait()
        topo.remove()
