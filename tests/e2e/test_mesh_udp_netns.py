"""UDP over the mesh across namespaces: client -> gate A (gateway namespace, tproxy_udp capture, routes
via b) -> CONNECT-UDP streams over HTTP/2 + mutual TLS -> gate B (server namespace) -> dnsmasq, iperf3 and
a QUIC server (aioquic) in the server namespace. Real clients: dig, iperf3 -u, an aioquic client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.e2e.test_capture import gateway_config, spawn, wait_listening
from tests.e2e.test_mesh import keygen

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
PREFIX = f"ugmu{os.getpid() % 100000}"
QUIC_PORT = 4433

QUIC_SERVER = """
import asyncio, sys
from aioquic.asyncio import serve
from aioquic.quic.configuration import QuicConfiguration

def handler(reader, writer):
    async def echo():
        data = await reader.read()
        writer.write(b"quic echo: " + data)
        writer.write_eof()
    asyncio.ensure_future(echo())

async def main():
    config = QuicConfiguration(is_client=False, alpn_protocols=["echo"])
    config.load_cert_chain(sys.argv[1], sys.argv[2])
    await serve("0.0.0.0", int(sys.argv[3]), configuration=config, stream_handler=handler)
    await asyncio.Future()

asyncio.run(main())
"""

QUIC_CLIENT = """
import asyncio, ssl, sys
from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

async def main():
    config = QuicConfiguration(is_client=True, alpn_protocols=["echo"], server_name="quic.example.test",
                               verify_mode=ssl.CERT_NONE)
    async with connect(sys.argv[1], int(sys.argv[2]), configuration=config) as client:
        reader, writer = await client.create_stream()
        writer.write(b"hello over the mesh")
        writer.write_eof()
        print((await asyncio.wait_for(reader.read(), 5)).decode())

asyncio.run(asyncio.wait_for(main(), 10))
"""


@pytest.fixture(scope="module")
def topo() -> Iterator[netns.Topology]:
    netns.remove(PREFIX)
    topology = netns.router(PREFIX)
    a = topology.addr
    dns = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--user=root", "--bind-interfaces",
           f"--listen-address={a['server4']},{a['server6']}", "--address=/test.example/10.1.2.3", "--pid-file="]
    servers = [spawn(topology, "server", "iperf3", "-s", "-p", "5201"), spawn(topology, "server", *dns)]
    try:
        wait_listening(topology, "server", 5201)
        yield topology
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()
        topology.remove()


def records(gate: Any) -> list[dict[str, Any]]:
    return [r for r in gate.records() if r.get("path") == "udp"]


def test_dig_iperf3_and_quic_cross_the_mesh_and_b_refuses_what_a_may_not_reach(
        start_gate: Any, topo: netns.Topology, tmp_path: Path) -> None:
    a = topo.addr
    keygen(tmp_path / "a")
    id_b = keygen(tmp_path / "b")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "quic.key"), "-out", str(tmp_path / "quic.pem"), "-days", "2",
                    "-subj", "/CN=quic.example.test"], check=True, capture_output=True)
    quic = spawn(topo, "server", sys.executable, "-c", QUIC_SERVER, str(tmp_path / "quic.pem"),
                 str(tmp_path / "quic.key"), str(QUIC_PORT))
    try:
        deadline = time.monotonic() + 10
        while f":{QUIC_PORT} " not in topo.run("server", "ss", "-Hlun"):
            assert time.monotonic() < deadline, "the QUIC server did not start"
            time.sleep(0.05)
        b = start_gate(
            [{"name": "mesh", "kind": "h2", "listen": f"{a['server4']}:15008"}],
            netns=topo.ns["server"], mesh={"identity": str(tmp_path / "b")},
            peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"),
                    "allow": [{"dst": [f"{a['server4']}/32", f"{a['server6']}/128"],
                               "port": [53, 5201, QUIC_PORT]}]}],
        )
        listeners, capture = gateway_config("tproxy", udp=True)
        gate_a = start_gate(listeners, routes=[{"via": "b", "name": "to-b"}], netns=topo.ns["gateway"],
                            capture=capture, mesh={"identity": str(tmp_path / "a")},
                            peers=[{"name": "b", "address": f"{a['server4']}:15008", "id": id_b}])
        for server in (a["server4"], a["server6"]):
            # dig takes answers only from the address it asked: the reply source is the original server's
            got = topo.run("client", "dig", f"@{server}", "test.example", "+short", "+tries=2", "+time=3")
            assert got.strip() == "10.1.2.3", gate_a.stderr()[-3000:]
        refused = subprocess.run(topo.cmd("client", "dig", "-p", "5353", f"@{a['server4']}", "test.example",
                                          "+tries=1", "+time=2"), capture_output=True, text=True)
        assert refused.returncode != 0  # B's allow list does not admit port 5353: no answer at all
        out = topo.run("client", "iperf3", "-c", a["server4"], "-u", "-b", "20M", "-l", "1200", "-t", "2", "-J")
        summary = json.loads(out)["end"]["sum"]
        assert summary["packets"] > 1000 and summary["lost_percent"] < 5, summary
        got = topo.run("client", sys.executable, "-c", QUIC_CLIENT, a["server4"], str(QUIC_PORT))
        assert got.strip() == "quic echo: hello over the mesh"
        gate_a.stop()
        assert b.stop() == 0
        assert "Traceback" not in gate_a.stderr() + b.stderr()
        mine, theirs = records(gate_a), records(b)
        assert all(r["action"] == "via" and r["peer"] == "b" for r in mine if r["dst"] != "-")
        dns = [r for r in mine if r["dst"] in (f"{a['server4']}:53", f"[{a['server6']}]:53")]
        assert len(dns) == 2 and all(r["protocol"] == "dns" and r["bytes_down"] > 0 for r in dns)
        assert any(r["close"] == "rejected" and r["dst"].endswith(":5353") for r in mine), mine
        # B: one inner flow per destination, with A's client as the client
        assert {r["dst"] for r in theirs if r["close"] != "rejected"} >= {
            f"{a['server4']}:53", f"[{a['server6']}]:53", f"{a['server4']}:5201", f"{a['server4']}:{QUIC_PORT}"}
        assert all(r["client"].startswith(a["client4"]) or r["client"].startswith(f"[{a['client6']}]")
                   for r in theirs)
        (no,) = [r for r in theirs if r["close"] == "rejected"]
        assert no["dst"] == f"{a['server4']}:5353" and "may not reach" in no["detail"]
        (bulk,) = [r for r in theirs if r["dst"] == f"{a['server4']}:5201"]
        assert bulk["bytes_up"] >= summary["packets"] * 1200 * 0.9
        (q,) = [r for r in theirs if r["dst"] == f"{a['server4']}:{QUIC_PORT}"]
        assert q["protocol"] == "quic" and q["sni"] == "quic.example.test" and q["bytes_down"] > 1000
    finally:
        quic.terminate()
        quic.wait()

