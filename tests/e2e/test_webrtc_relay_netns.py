"""Issue 13's NAT acceptance: gates A and C, each behind its own MASQUERADE NAT (tests.netns.two_nats),
both keep tunnels to the public gate B and neither can reach the other over TCP. A's flows ``via: c``
go over a WebRTC data channel straight between A and C (host and server-reflexive candidates from B's
``stun`` listener; the ICE checks punch both NATs): the offer and answer are relayed by B, which moves
only those few KB. With UDP between the sites dropped in C's NAT, the flows fall back to HTTP/2 through
B (B's route ``via: c`` sends them on over C's reverse tunnel) within the ICE timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.e2e.test_capture import spawn, wait_listening
from tests.e2e.test_mesh import keygen
from tests.e2e.test_webrtc_netns import CLIENT, ECHO, ECHO_PORT
from tests.e2e.test_webrtc_udp import by_path, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

H2_PORT, STUN_PORT, DNS_PORT = 15008, 3478, 5353
# In C's NAT: no UDP between the two sites (STUN to B still passes; the flows must fall back)
NO_UDP_BETWEEN_SITES = """
table inet ugrr_no_udp {
  chain forward_udp {
    type filter hook forward priority -10; policy accept
    meta l4proto udp ip saddr 198.18.1.0/24 drop
    meta l4proto udp ip daddr 198.18.1.0/24 drop
  }
}
"""
SIGNALING_AT_MOST = 256 << 10  # bytes crossing B's interface while 2 x 20 MB flow: tunnels' keepalives,
# the relayed offer and answer, STUN; the flow's bytes would be 40 MB


@pytest.fixture
def sites() -> Iterator[netns.Topology]:
    prefix = f"ugrr{os.getpid() % 100000}"
    netns.remove(prefix)
    topo = netns.two_nats(prefix)
    echo = None
    try:
        echo = spawn(topo, "c", sys.executable, "-c", ECHO, str(ECHO_PORT))  # the server behind C
        wait_listening(topo, "c", ECHO_PORT)
        yield topo
    finally:
        if echo is not None:
            echo.terminate()
            echo.wait()
        topo.remove()


def start_three(start_gate: Any, tmp_path: Path, topo: netns.Topology, relay: list[str] | None = None,
                a_names_c: str = "c") -> dict[str, Any]:
    """B public (h2 + stun, relays A's signaling to C when ``relay`` lists c), A and C behind their NATs
    with reverse tunnels to B, each knowing the other as ``via_gate: b``. ``a_names_c``: whose
    certificate A holds for its peer c (another gate's: A names a target B does not know)."""
    a = topo.addr
    id_b = keygen(tmp_path / "b")
    for name in ("a", "c", "x"):
        keygen(tmp_path / name)
    target = f"{a['c4']}/32"
    public = f"{a['b4']}:{H2_PORT}"
    stun = [f"{a['b4']}:{STUN_PORT}"]
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": public},
         {"name": "stun", "kind": "stun", "listen": f"{a['b4']}:{STUN_PORT}"}],
        routes=[{"match": {"listener": ["mesh"], "dst": [target]}, "via": "c", "name": "a-to-c"},
                {"action": "reject"}],
        netns=topo.ns["b"], mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "relay": ["c"] if relay is None else relay,
                "allow": [{"dst": [target], "port": [ECHO_PORT, DNS_PORT]}]},
               {"name": "c", "cert": str(tmp_path / "c" / "cert.pem")}],
    )
    c = start_gate(
        [], netns=topo.ns["c"], mesh={"identity": str(tmp_path / "c"), "stun": stun},
        peers=[{"name": "b", "address": public, "id": id_b, "reverse": True,
                "allow": [{"dst": [target], "port": [ECHO_PORT, DNS_PORT]}]},
               {"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "via_gate": "b",
                "transports": ["webrtc", "h2"], "allow": [{"dst": [target], "port": [ECHO_PORT, DNS_PORT]}]}],
    )
    gate_a = start_gate(
        [{"name": "socks", "kind": "socks5", "listen": "127.0.0.1:1080"}],
        routes=[{"via": "c", "name": "to-c"}],
        netns=topo.ns["a"], mesh={"identity": str(tmp_path / "a"), "stun": stun},
        peers=[{"name": "b", "address": public, "id": id_b, "reverse": True},
               {"name": "c", "cert": str(tmp_path / a_names_c / "cert.pem"), "via_gate": "b",
                "transports": ["webrtc", "h2"]}],
    )
    deadline = time.monotonic() + 15
    while not all(f"reverse tunnel from gate {n} (" in b.stderr() for n in ("a", "c")):
        assert time.monotonic() < deadline, b.stderr()[-2000:]
        time.sleep(0.05)
    return {"a": gate_a, "b": b, "c": c}


def echo_from_a(topo: netns.Topology, size: int) -> str:
    """Through A's SOCKS to the echo server behind C: ``OK size`` when every byte came back in order."""
    return subprocess.run(topo.cmd("a", sys.executable, "-c", CLIENT, topo.addr["c4"], str(ECHO_PORT), str(size)),
                          capture_output=True, text=True, timeout=300).stdout.strip()


def b_bytes(topo: netns.Topology) -> int:
    """Bytes B's one interface received and sent so far."""
    return sum(int(topo.run("b", "cat", f"/sys/class/net/eth0/statistics/{way}_bytes")) for way in ("rx", "tx"))


def test_flows_go_straight_between_the_nats_with_signaling_relayed_by_b(start_gate: Any, tmp_path: Path,
                                                                         sites: netns.Topology) -> None:
    gates = start_three(start_gate, tmp_path, sites)
    assert echo_from_a(sites, 1 << 10) == f"OK {1 << 10}", gates["a"].stderr()[-3000:]  # connects WebRTC
    before = b_bytes(sites)
    size = 20 << 20
    assert echo_from_a(sites, size) == f"OK {size}", gates["a"].stderr()[-3000:]
    through_b = b_bytes(sites) - before
    print(f"bytes through B while 2 x {size} crossed: {through_b}")
    assert through_b < SIGNALING_AT_MOST, (through_b, gates["a"].stderr()[-3000:])
    records = gates["c"].wait_records(2)
    assert [(r["path"], r["bytes_up"], r["bytes_down"]) for r in records] == [
        ("webrtc", 1 << 10, 1 << 10), ("webrtc", size, size)], records
    assert [(r["action"], r["peer"]) for r in gates["a"].wait_records(2)] == [("via", "c")] * 2
    assert gates["b"].records() == []  # no flow crossed B
    assert gates["a"].stderr().count("webrtc: connected to c") == 1
    assert "relayed a webrtc exchange from a to c" in gates["b"].stderr()
    # (neither host address is reachable from the other site: the NATs' addresses, which only B's stun
    # listener tells them, are what connected)
    assert "falls back" not in gates["a"].stderr(), gates["a"].stderr()[-3000:]


def test_udp_blocked_between_the_nats_falls_back_to_h2_through_b(start_gate: Any, tmp_path: Path,
                                                                  sites: netns.Topology) -> None:
    sites.run("nc", "nft", "-f", "-", input_text=NO_UDP_BETWEEN_SITES)
    gates = start_three(start_gate, tmp_path, sites)
    started = time.monotonic()
    size = 4 << 20
    assert echo_from_a(sites, size) == f"OK {size}", gates["a"].stderr()[-3000:]
    assert time.monotonic() - started < 15  # the ICE timeout (2.5 s: half the connect timeout) and the flow
    assert [(r["listener"], r["path"], r["bytes_up"]) for r in gates["c"].wait_records(1)] == [("b", "h2", size)]
    assert [(r["listener"], r["action"], r["peer"], r["rule"]) for r in gates["b"].wait_records(1)] == [
        ("mesh", "via", "c", "a-to-c")]
    assert "falls back to h2" in gates["a"].stderr()
    assert "relayed a webrtc exchange from a to c" in gates["b"].stderr()  # signaling worked, ICE did not


def test_dns_from_a_reaches_dnsmasq_behind_c_over_an_unordered_channel(start_gate: Any, tmp_path: Path,
                                                                      sites: netns.Topology) -> None:
    """UDP across the two NATs: socksify drill on A (SOCKS5 UDP ASSOCIATE to A's listener, routed via c)
    asks a dnsmasq behind C; the datagrams cross an unordered channel of the WebRTC connection straight
    between A and C (C's record: path webrtc-udp), and B carries no flow."""
    if not all(shutil.which(tool) for tool in ("socksify", "drill", "dnsmasq")):
        pytest.skip("socksify (dante-client), drill (ldnsutils) or dnsmasq (dnsmasq-base) is not installed")
    c4 = sites.addr["c4"]
    dns = spawn(sites, "c", "dnsmasq", "-k", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
                "-p", str(DNS_PORT), f"--listen-address={c4}", "--bind-interfaces",
                "--address=/example.test/192.0.2.7", f"--pid-file={tmp_path / 'dnsmasq.pid'}")
    try:
        gates = start_three(start_gate, tmp_path, sites)
        assert echo_from_a(sites, 1 << 10) == f"OK {1 << 10}", gates["a"].stderr()[-3000:]  # connects WebRTC
        conf = tmp_path / "socks.conf"
        conf.write_text("route {\n  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = 1080\n"
                        "  proxyprotocol: socks_v5\n  command: udpassociate connect\n  method: none\n}\n")
        got = subprocess.run(sites.cmd("a", "env", f"SOCKS_CONF={conf}", "SOCKS_AUTOADD_LANROUTES=no", "socksify",
                                       "drill", "-p", str(DNS_PORT), f"@{c4}", "example.test"),
                             capture_output=True, text=True, timeout=60)
        assert "192.0.2.7" in got.stdout, (got.stdout, got.stderr, gates["a"].stderr()[-3000:])
        (inner,) = wait_for(lambda: by_path(gates["c"], "webrtc-udp"))
        assert (inner["protocol"], inner["dst"], inner["host"]) == ("dns", f"{c4}:{DNS_PORT}", "example.test")
        assert gates["b"].records() == []  # B relayed the signaling, no flow
    finally:
        dns.terminate()
        dns.wait()
