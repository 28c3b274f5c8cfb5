"""The router-path part of scripts/bench (root): client ns -> gateway ns -> server ns.

TCP, one iperf3 stream: plain kernel forwarding (the limit), ugate `tproxy` (splice), and HAProxy as the
transparent peer (`bind ... transparent`, `server s 0.0.0.0:0` = the original destination, forced
splice), steered by the same TPROXY rules. UDP: delivered packets/s of 1200-byte datagrams through
ugate `tproxy_udp` and through nginx stream UDP on the gateway, twice: with the gateway's LAN veth plain
(every packet handed over alone, in the sender's syscall) and NIC-like (GRO with threaded NAPI, as a real
NIC's driver batches; see tests/netns.py nic_like). Rounds are interleaved; medians.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402

SERVER_PORT = 5201


def _wait_listening(topo: netns.Topology, role: str, port: int, udp: bool = False) -> None:
    deadline = time.monotonic() + 10
    while f":{port} " not in topo.run(role, "ss", "-Hlun" if udp else "-Hltn"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {port} in {role}")
        time.sleep(0.05)


def _gate_config(d: Path, name: str, tcp_port: int, udp_port: int | None, capture_only: bool = False) -> Path:
    listeners = [{"name": "t4", "kind": "tproxy", "listen": f"0.0.0.0:{tcp_port}", "relay": "splice"}]
    if udp_port:
        listeners.append({"name": "u4", "kind": "tproxy_udp", "listen": f"0.0.0.0:{udp_port}"})
    config = {"log": {"level": "warning", "access": "off"}, "listeners": listeners,
              "capture": {"mode": "tproxy", "role": "router", "interfaces": ["lan0"],
                          "apply": "manual" if capture_only else "auto"}}
    path = d / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


class _Running:
    """A process in a namespace, stopped with SIGTERM; every one started is in ``_Running.started``."""

    started: list[_Running] = []

    def __init__(self, topo: netns.Topology, role: str, argv: list[str]) -> None:
        self.proc = subprocess.Popen(topo.cmd(role, *argv), cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _Running.started.append(self)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _iperf(topo: netns.Topology, target: str, seconds: int, udp: bool) -> float | None:
    argv = ["iperf3", "-c", target, "-p", str(SERVER_PORT), "-t", str(seconds), "-J"]
    if udp:
        argv += ["-u", "-l", "1200", "-b", "2G"]
    done = subprocess.run(topo.cmd("client", *argv), capture_output=True, text=True, timeout=seconds + 30)
    try:
        end = json.loads(done.stdout)["end"]
        if udp:
            s = end["sum"]
            return float(s["packets"] - s["lost_packets"]) / float(s["seconds"])
        return float(end["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError):
        return None


def run(seconds: int, repeat: int, report: Callable[[str], None],
        ugate_cmd: list[str] | None = None) -> dict[str, list[float]]:
    """Measure every row ``repeat`` times, interleaved; returns the samples by row name."""
    py = sys.executable
    gate_cmd = ugate_cmd or [py, "-m", "gate"]
    d = Path(tempfile.mkdtemp(prefix="ugate-bench-router-"))
    netns.remove("ugb")
    topo = netns.router("ugb")
    server4, lan4 = topo.addr["server4"], topo.addr["gateway_lan4"]
    rows = ("kernel", "ugate", "haproxy", "udp ugate", "udp nginx", "udp ugate gro", "udp nginx gro")
    samples: dict[str, list[float]] = {k: [] for k in rows}

    def udp_both_ways(row: str, target: str) -> None:
        samples[row].append(_iperf(topo, target, seconds, udp=True) or 0)
        netns.nic_like(topo, "gateway", "lan0")
        try:
            samples[f"{row} gro"].append(_iperf(topo, target, seconds, udp=True) or 0)
        finally:
            netns.nic_like(topo, "gateway", "lan0", on=False)

    _Running(topo, "server", ["iperf3", "-s", "-p", str(SERVER_PORT)])
    ha_cfg = d / "ha.cfg"
    ha_cfg.write_text("""global
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen transparent
  bind 0.0.0.0:15101 transparent
  option splice-request
  option splice-response
  server s 0.0.0.0:0
""")
    ng_cfg = d / "ng.conf"
    ng_cfg.write_text(f"""worker_processes 1; pid {d}/ng.pid; error_log {d}/ng.err; daemon off;
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
events {{ worker_connections 4096; }}
stream {{ server {{ listen {lan4}:{SERVER_PORT}; proxy_pass {server4}:{SERVER_PORT}; }}
         server {{ listen {lan4}:{SERVER_PORT} udp; proxy_pass {server4}:{SERVER_PORT}; }} }}
""")
    ugate_cfg = _gate_config(d, "ugate", 15001, 15002)
    ha_rules = _gate_config(d, "ha-rules", 15101, None, capture_only=True)
    try:
        _wait_listening(topo, "server", SERVER_PORT)
        for r in range(repeat):
            samples["kernel"].append(_iperf(topo, server4, seconds, udp=False) or 0)
            gate = _Running(topo, "gateway", [*gate_cmd, "--config", str(ugate_cfg)])
            _wait_listening(topo, "gateway", 15001)
            time.sleep(0.3)
            samples["ugate"].append(_iperf(topo, server4, seconds, udp=False) or 0)
            udp_both_ways("udp ugate", server4)
            gate.stop()
            subprocess.run(topo.cmd("gateway", py, "-m", "gate", "rules", "apply", "--config", str(ha_rules)),
                           cwd=ROOT, check=True, capture_output=True)
            haproxy = _Running(topo, "gateway", ["haproxy", "-f", str(ha_cfg), "-db"])
            _wait_listening(topo, "gateway", 15101)
            samples["haproxy"].append(_iperf(topo, server4, seconds, udp=False) or 0)
            haproxy.stop()
            subprocess.run(topo.cmd("gateway", py, "-m", "gate", "rules", "clear", "--config", str(ha_rules)),
                           cwd=ROOT, check=True, capture_output=True)
            nginx = _Running(topo, "gateway", ["nginx", "-c", str(ng_cfg)])
            _wait_listening(topo, "gateway", SERVER_PORT, udp=True)
            udp_both_ways("udp nginx", lan4)
            nginx.stop()
            report(f"  router round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()))
    finally:
        for running in _Running.started:
            running.stop()
        _Running.started.clear()
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(topo.cmd("gateway", py, "-m", "gate", "rules", "clear", "--config", str(ha_rules)),
                           cwd=ROOT, check=True, capture_output=True)
        topo.remove()
        shutil.rmtree(d, ignore_errors=True)
    return samples
