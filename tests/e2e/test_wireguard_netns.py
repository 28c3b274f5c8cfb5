"""WireGuard endpoints found by ICE, mode 3 (nftables port rewrite keyed on STUN's cookie): two sites, each
a wireguard-go behind its own MASQUERADE NAT with a ugate beside it, and a public gate that relays the
signalling and is the STUN server. After start, ping crosses the tunnel; the sites' nft counters show STUN
and WireGuard on the same ICE port; ugate's ICE sockets saw no WireGuard; SIGTERM removes the rules, and
a gate killed with -9 leaves them for the next start to replace."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.e2e.test_mesh import keygen

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
              pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None,
                                 reason="needs wireguard-go and wireguard-tools (apt-get install wireguard-go "
                                        "wireguard-tools)")]

# A home router: masquerade, and a firewall that drops what was not asked for, on input as well. Without the
# input drop, an ICE check arriving before the router's own host sent one leaves a conntrack entry (to a
# closed local port) that clashes with the mapping the host's check then needs: masquerade picks another
# port, on both sides, and no pair ever works (a dropped packet's entry is never confirmed).
NAT = """
table ip ugwg_nat {
  chain post {
    type nat hook postrouting priority 100
    oifname "wan0" masquerade
  }
}
table inet ugwg_fw {
  chain input_in {
    type filter hook input priority 0; policy drop
    ct state established,related accept
    iifname { "lan0", "lo" } accept
  }
  chain forward_in {
    type filter hook forward priority 0; policy drop
    ct state established,related accept
    iifname "lan0" accept
  }
}
"""
LISTEN_PORT = 51820  # the WireGuard interfaces'
ICE_PORT = 51900  # the outer port both share with ICE
TUNNEL = {"site_a": "10.99.0.1", "site_b": "10.99.0.2"}


@dataclass
class Sites:
    topo: netns.Topology
    ifname: dict[str, str]


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    prefix = f"ugwg{os.getpid() % 10000}"
    netns.remove(prefix)
    topo = netns.two_sites(prefix)
    procs: list[subprocess.Popen[bytes]] = []
    ifname = {"site_a": f"{prefix}a", "site_b": f"{prefix}b"}  # unique: wireguard-go's socket files are global
    try:
        for nat in ("nat_a", "nat_b"):
            topo.run(nat, "nft", "-f", "-", input_text=NAT)
        for site in ("site_a", "site_b"):
            key = tmp_path / f"{site}.key"
            key.write_bytes(subprocess.run(["wg", "genkey"], check=True, capture_output=True).stdout)
            key.chmod(0o600)
            procs.append(subprocess.Popen(topo.cmd(site, "wireguard-go", "-f", ifname[site]),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 10
            while subprocess.run(topo.cmd(site, "wg", "show", ifname[site]), capture_output=True).returncode:
                assert time.monotonic() < deadline, "wireguard-go did not come up"
                time.sleep(0.05)
            topo.run(site, "wg", "set", ifname[site], "private-key", str(key), "listen-port", str(LISTEN_PORT))
            topo.run(site, "ip", "addr", "add", f"{TUNNEL[site]}/24", "dev", ifname[site])
            topo.run(site, "ip", "link", "set", ifname[site], "up")
        yield Sites(topo, ifname)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        topo.remove()


def _gates(start_gate: Any, tmp_path: Path, sites: Sites, mode: str = "nftables") -> dict[str, Any]:
    topo, a = sites.topo, sites.topo.addr
    ids = {name: keygen(tmp_path / name) for name in ("pub", "site_a", "site_b")}
    pub = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"{a['public']}:15008"},
         {"name": "stun", "kind": "stun", "listen": f"{a['public']}:3478"}],
        routes=[{"action": "reject"}], netns=topo.ns["public"], mesh={"identity": str(tmp_path / "pub")},
        peers=[{"name": site, "cert": str(tmp_path / site / "cert.pem")} for site in ("site_a", "site_b")],
        wireguard={"relay": True})
    return {"pub": pub, "ids": ids, **{site: _site_gate(start_gate, tmp_path, sites, site, ids, mode)
                                       for site in ("site_a", "site_b")}}


def _site_gate(start_gate: Any, tmp_path: Path, sites: Sites, site: str, ids: dict[str, str],
               mode: str = "nftables") -> Any:
    """site_a dials the public gate (and so offers); site_b is reachable only through its reverse tunnel."""
    a = sites.topo.addr
    other = "site_b" if site == "site_a" else "site_a"
    hub = {"name": "pub", "address": f"{a['public']}:15008", "id": ids["pub"], "reverse": site == "site_b"}
    return start_gate(
        [] if site == "site_b" else [{"name": "socks", "kind": "socks5", "listen": "127.0.0.1:1080"}],
        routes=[{"action": "reject"}], netns=sites.topo.ns[site], mesh={"identity": str(tmp_path / site)},
        peers=[hub],
        wireguard={"interface": sites.ifname[site], "stun": [f"{a['public']}:3478"], "mode": mode,
                   "peers": [{"gate": ids[other], "via": "pub", "ice_port": ICE_PORT,
                              "allowed_ips": [f"{TUNNEL[other]}/32"]}]})


def _logs(gates: dict[str, Any]) -> str:
    return "\n".join(gates[name].stderr()[-3000:] for name in ("pub", "site_a", "site_b"))


def _ping(topo: netns.Topology, site: str, dst: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(topo.cmd(site, "ping", "-c", "1", "-W", "1", dst), capture_output=True).returncode == 0:
            return True
    return False


def _counters(topo: netns.Topology, site: str) -> dict[str, int]:
    """Packets per rule comment of the site's ``ugate_wg`` table."""
    out: dict[str, int] = {}
    for line in topo.run(site, "nft", "list", "table", "inet", "ugate_wg").splitlines():
        if "counter packets" in line and "comment" in line:
            packets = int(line.split("counter packets ")[1].split()[0])
            comment = line.split('comment "')[1].split(":")[0]
            out[comment] = out.get(comment, 0) + packets
    return out


def _has_table(topo: netns.Topology, site: str) -> bool:
    return "ugate_wg" in topo.run(site, "nft", "list", "tables")


def test_mode3_ping_over_ice_found_endpoints(start_gate: Any, tmp_path: Path, sites: Sites) -> None:
    topo = sites.topo
    gates = _gates(start_gate, tmp_path, sites)
    assert _ping(topo, "site_a", TUNNEL["site_b"], 60), _logs(gates)
    assert _ping(topo, "site_b", TUNNEL["site_a"], 10)
    for site in ("site_a", "site_b"):
        counts = _counters(topo, site)
        # both arrived on ICE_PORT (the rules match nothing else): STUN to ugate, WireGuard to the interface
        assert counts["stun"] > 0 and counts["wireguard"] > 0, counts
        endpoint = topo.run(site, "wg", "show", sites.ifname[site], "endpoints").split()[1]
        assert endpoint.startswith(topo.addr["nat_b" if site == "site_a" else "nat_a"] + ":"), endpoint
    for site in ("site_a", "site_b"):
        assert gates[site].stop() == 0
        assert not _has_table(topo, site)
        ended = [r for r in gates[site].records() if r.get("event") == "wireguard ended"]
        assert ended and all(r["wireguard"] == 0 and r["other"] == 0 for r in ended), ended
        assert sum(r["stun"] for r in ended) > 0, ended


def test_mode3_nat_rebinding(start_gate: Any, tmp_path: Path, sites: Sites) -> None:
    """The NAT forgets every mapping (conntrack flushed): the next datagram from the site makes a new one,
    which keeps the port here, so WireGuard and ICE go on; ping is back within 10 s."""
    topo = sites.topo
    gates = _gates(start_gate, tmp_path, sites)
    assert _ping(topo, "site_a", TUNNEL["site_b"], 60), _logs(gates)
    topo.run("nat_a", "conntrack", "-F")
    started = time.monotonic()
    assert _ping(topo, "site_a", TUNNEL["site_b"], 10), _logs(gates)
    assert _ping(topo, "site_b", TUNNEL["site_a"], 10)
    assert time.monotonic() - started < 10


def test_mode1_ping_through_the_user_space_relay(start_gate: Any, tmp_path: Path, sites: Sites) -> None:
    topo = sites.topo
    gates = _gates(start_gate, tmp_path, sites, mode="proxy")
    assert _ping(topo, "site_a", TUNNEL["site_b"], 60), _logs(gates)
    assert _ping(topo, "site_b", TUNNEL["site_a"], 10)
    for site in ("site_a", "site_b"):
        assert not _has_table(topo, site)  # no rules in mode 1
        endpoint = topo.run(site, "wg", "show", sites.ifname[site], "endpoints").split()[1]
        assert endpoint.startswith("127.0.0.1:"), endpoint  # WireGuard talks to our relay
    # the relay takes WireGuard's datagrams from WireGuard's listen port only
    relay_port = int(topo.run("site_a", "wg", "show", sites.ifname["site_a"], "endpoints").split()[1].split(":")[1])
    stray = "import socket; socket.socket(2, 2).sendto(bytes([4, 0, 0, 0]) + bytes(40), ('127.0.0.1', %d))"
    topo.run("site_a", sys.executable, "-c", stray % relay_port)
    for site in ("site_a", "site_b"):
        assert gates[site].stop() == 0
        ended = [r for r in gates[site].records() if r.get("event") == "wireguard ended"]
        # STUN and WireGuard both reached ugate's ICE socket, i.e. the one outer port; WireGuard went out of it
        assert sum(r["stun"] for r in ended) > 0 and sum(r["wireguard"] for r in ended) > 0, ended
        assert sum(r["wireguard_out"] for r in ended) > 0 and all(r["other"] == 0 for r in ended), ended
    assert sum(r["proxy_refused"] for r in gates["site_a"].records() if r.get("event") == "wireguard ended") == 1


def test_mode3_kill_9_leaves_rules_that_a_restart_replaces(start_gate: Any, tmp_path: Path, sites: Sites) -> None:
    topo = sites.topo
    gates = _gates(start_gate, tmp_path, sites)
    assert _ping(topo, "site_a", TUNNEL["site_b"], 60)
    gates["site_a"].proc.send_signal(signal.SIGKILL)
    gates["site_a"].proc.wait()
    assert _has_table(topo, "site_a")  # a killed gate clears nothing
    config = tmp_path / "gate1.yaml"  # site_a's (the second gate started)
    shown = subprocess.run(topo.cmd("site_a", sys.executable, "-m", "gate", "--config", str(config), "rules", "show"),
                           capture_output=True, text=True, check=True).stdout
    assert f"udp dport {ICE_PORT} @th,96,32 != 0x2112a442 counter notrack udp dport set {LISTEN_PORT}" in shown
    # the restarted gate replaces the table (empty output map: the old pair is not trusted) and runs ICE again
    restarted = _site_gate(start_gate, tmp_path, sites, "site_a", gates["ids"])
    assert _ping(topo, "site_a", TUNNEL["site_b"], 60), restarted.stderr()[-3000:]
    assert topo.run("site_a", "nft", "list", "tables").count("ugate_wg") == 1
    assert restarted.stop() == 0
    assert not _has_table(topo, "site_a")
    # and `ugate rules clear` removes what a killed gate left
    gates["site_b"].proc.send_signal(signal.SIGKILL)
    gates["site_b"].proc.wait()
    assert _has_table(topo, "site_b")
    cleared = subprocess.run(topo.cmd("site_b", sys.executable, "-m", "gate", "--config", str(tmp_path / "gate2.yaml"),
                                      "rules", "clear"), capture_output=True, text=True)
    assert cleared.returncode == 0, cleared.stderr
    assert not _has_table(topo, "site_b")


@pytest.mark.parametrize("mode", ["nftables", "proxy"])
def test_listen_port_change(start_gate: Any, tmp_path: Path, sites: Sites, mode: str) -> None:
    """Mode 3 rebuilds its rules (their input rewrite targets the port); mode 1's relays follow it."""
    topo = sites.topo
    gates = _gates(start_gate, tmp_path, sites, mode)
    assert _ping(topo, "site_a", TUNNEL["site_b"], 60), _logs(gates)
    topo.run("site_b", "wg", "set", sites.ifname["site_b"], "listen-port", str(LISTEN_PORT + 7))
    started = time.monotonic()
    assert _ping(topo, "site_a", TUNNEL["site_b"], 10), _logs(gates)
    assert time.monotonic() - started < 10
    if mode == "nftables":
        assert f"udp dport set {LISTEN_PORT + 7}" in topo.run("site_b", "nft", "list", "table", "inet", "ugate_wg")
        assert "rules rebuilt" in gates["site_b"].stderr()
    else:
        assert "relays follow" in gates["site_b"].stderr()
