"""iperf3 over a WireGuard tunnel between two NATed sites (tests.netns.two_sites, wireguard-go at both ends):
plain WireGuard (endpoints set by hand to the other NAT's address, no ICE) against ugate's mode 3
(nftables port rewrite: WireGuard stays in the kernel's path) and mode 1 (user-space relay in ugate).
One run each, TCP, ``--seconds`` long; prints Mbit/s and the ratios to plain. Root only.
Standalone: ``python3 scripts/bench_wireguard.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402
from tests.e2e.test_wireguard_netns import ICE_PORT, LISTEN_PORT, NAT, TUNNEL  # noqa: E402

PREFIX = "ugwgbench"


def _gate(topo: netns.Topology, role: str, config: dict[str, Any], tmp: Path) -> subprocess.Popen[bytes]:
    path = tmp / f"{role}.yaml"
    config = {"log": {"level": "info", "access": "off"}, "routes": [{"action": "reject"}], **config}
    path.write_text(yaml.safe_dump(config))
    err = tmp / f"{role}.stderr"
    proc = subprocess.Popen(topo.cmd(role, sys.executable, "-m", "gate", "--config", str(path)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=err.open("wb"))
    deadline = time.monotonic() + 10
    while "ugate ready" not in err.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{role}: ugate did not start:\n{err.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def _ping(topo: netns.Topology, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(topo.cmd("site_a", "ping", "-c", "1", "-W", "1", TUNNEL["site_b"]),
                         capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError("no ping over the tunnel")


def _iperf(topo: netns.Topology, seconds: int) -> float:
    server = subprocess.Popen(topo.cmd("site_b", "iperf3", "-s", "-1", "-B", TUNNEL["site_b"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        out = subprocess.run(topo.cmd("site_a", "iperf3", "-c", TUNNEL["site_b"], "-t", str(seconds), "-J"),
                             capture_output=True, text=True, check=True).stdout
    finally:
        server.wait(timeout=30)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6


def _forget_peers(topo: netns.Topology, ifname: dict[str, str]) -> None:
    for site in ("site_a", "site_b"):
        for line in topo.run(site, "wg", "show", ifname[site], "peers").split():
            topo.run(site, "wg", "set", ifname[site], "peer", line, "remove")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    netns.remove(PREFIX)
    topo = netns.two_sites(PREFIX)
    procs: list[subprocess.Popen[bytes]] = []
    ifname = {"site_a": "ugwgbencha", "site_b": "ugwgbenchb"}
    results: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            for nat in ("nat_a", "nat_b"):
                topo.run(nat, "nft", "-f", "-", input_text=NAT)
            pub_key = {}
            for site in ("site_a", "site_b"):
                key = tmp / f"{site}.key"
                key.write_bytes(subprocess.run(["wg", "genkey"], check=True, capture_output=True).stdout)
                key.chmod(0o600)
                pub_key[site] = subprocess.run(["wg", "pubkey"], input=key.read_bytes(), check=True,
                                               capture_output=True).stdout.decode().strip()
                procs.append(subprocess.Popen(topo.cmd(site, "wireguard-go", "-f", ifname[site]),
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(0.5)
                topo.run(site, "wg", "set", ifname[site], "private-key", str(key), "listen-port", str(LISTEN_PORT))
                topo.run(site, "ip", "addr", "add", f"{TUNNEL[site]}/24", "dev", ifname[site])
                topo.run(site, "ip", "link", "set", ifname[site], "up")
            # plain WireGuard: each end aims at the other NAT (masquerade keeps port 51820), both keep alive
            for site, other, nat in (("site_a", "site_b", "nat_b"), ("site_b", "site_a", "nat_a")):
                topo.run(site, "wg", "set", ifname[site], "peer", pub_key[other], "allowed-ips",
                         f"{TUNNEL[other]}/32", "endpoint", f"{topo.addr[nat]}:{LISTEN_PORT}",
                         "persistent-keepalive", "1")
            _ping(topo, 30)
            results["plain"] = _iperf(topo, args.seconds)
            _forget_peers(topo, ifname)
            ids = {}
            for name in ("pub", "site_a", "site_b"):
                out = subprocess.run([sys.executable, "-m", "gate", "keygen", "--dir", str(tmp / name)], cwd=ROOT,
                                     check=True, capture_output=True, text=True).stdout
                ids[name] = out.split()[1]
            a = topo.addr
            for mode in ("nftables", "proxy"):
                started = [_gate(topo, "public", {
                    "listeners": [{"name": "mesh", "kind": "h2", "listen": f"{a['public']}:15008"},
                                  {"name": "stun", "kind": "stun", "listen": f"{a['public']}:3478"}],
                    "mesh": {"identity": str(tmp / "pub")}, "wireguard": {"relay": True},
                    "peers": [{"name": s, "cert": str(tmp / s / "cert.pem")} for s in ("site_a", "site_b")]}, tmp)]
                for site, other in (("site_a", "site_b"), ("site_b", "site_a")):
                    # site_a dials the public gate (and offers); site_b only keeps a reverse tunnel to it
                    started.append(_gate(topo, site, {
                        "listeners": [] if site == "site_b" else [
                            {"name": "socks", "kind": "socks5", "listen": "127.0.0.1:1080"}],
                        "mesh": {"identity": str(tmp / site)},
                        "peers": [{"name": "pub", "address": f"{a['public']}:15008", "id": ids["pub"],
                                   "reverse": site == "site_b"}],
                        "wireguard": {"interface": ifname[site], "mode": mode, "stun": [f"{a['public']}:3478"],
                                      "peers": [{"gate": ids[other], "via": "pub", "ice_port": ICE_PORT,
                                                 "allowed_ips": [f"{TUNNEL[other]}/32"]}]}}, tmp))
                try:
                    _ping(topo, 60)
                    results[mode] = _iperf(topo, args.seconds)
                finally:
                    for proc in started:
                        proc.terminate()
                        proc.wait()
                _forget_peers(topo, ifname)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        topo.remove()
    plain = results.get("plain") or 1.0
    print(f"{'wireguard over two NATs':<28} {'Mbit/s':>10} {'vs plain':>9}")
    for row, label in (("plain", "plain wireguard (no ICE)"), ("nftables", "ugate mode 3 (nftables)"),
                       ("proxy", "ugate mode 1 (user space)")):
        if row in results:
            print(f"{label:<28} {results[row]:>10.0f} {results[row] / plain:>8.2f}x")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    sys.exit(main())
