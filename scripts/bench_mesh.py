"""The mesh part of scripts/bench: iperf3 through gate A -> HTTP/2 over mutual TLS -> gate B, on loopback.

Rows: direct; ugate's tunnel (A's forward listener routed ``via`` B); a stunnel4 pair (client mode ->
server mode, TLS 1.3, the plain TLS tunnel peer), one stream and four. Also the setup latency of a new
flow on a warm tunnel: connect through A, one byte echoed by a server behind B, close (median ms),
against the same exchange direct. Rounds are interleaved; medians.

UDP over the mesh (root only: capture needs namespaces): delivered packets/s of 1200-byte iperf3 -u
datagrams from a client namespace, captured by gate A's tproxy_udp and carried as CONNECT-UDP capsules
to gate B in the server namespace, against plain kernel forwarding on the same path.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402

IPERF, ECHO = 15301, 15302
H2, A_IPERF, A_ECHO = 16108, 16101, 16102
STUNNEL_CLIENT, STUNNEL_SERVER = 16201, 16202
LATENCY_SAMPLES = 300


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Until something accepts on 127.0.0.1:``port`` (RuntimeError if ``proc`` exits first or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _echo_server() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", ECHO), backlog=512)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(16)
                if data:
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return listener


def _iperf(port: int, seconds: int, streams: int) -> float | None:
    done = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
                          capture_output=True, text=True, timeout=seconds + 30)
    try:
        return float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError):
        return None


def _latency_ms(port: int) -> float:
    samples = []
    for _ in range(LATENCY_SAMPLES):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"x")
            s.recv(16)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _configs(d: Path, py: str) -> tuple[Path, Path]:
    def keygen(name: str) -> str:
        out = subprocess.run([py, "-m", "gate", "keygen", "--dir", str(d / name)], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        return out.split()[1]

    keygen("a")
    id_b = keygen("b")
    quiet = {"level": "warning", "access": "off"}
    b = {"log": quiet, "mesh": {"identity": str(d / "b")},
         "peers": [{"name": "a", "cert": str(d / "a" / "cert.pem"), "allow": [{"port": [IPERF, ECHO]}]}],
         "listeners": [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{H2}"}], "routes": [{"action": "direct"}]}
    a = {"log": quiet, "mesh": {"identity": str(d / "a")},
         "peers": [{"name": "b", "address": f"127.0.0.1:{H2}", "id": id_b}],
         "listeners": [
             {"name": "iperf", "kind": "forward", "listen": f"127.0.0.1:{A_IPERF}", "to": f"127.0.0.1:{IPERF}"},
             {"name": "echo", "kind": "forward", "listen": f"127.0.0.1:{A_ECHO}", "to": f"127.0.0.1:{ECHO}"}],
         "routes": [{"via": "b"}]}
    (d / "a.yaml").write_text(json.dumps(a))
    (d / "b.yaml").write_text(json.dumps(b))
    return d / "a.yaml", d / "b.yaml"


def _stunnel_configs(d: Path) -> tuple[Path, Path]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-keyout", str(d / "st.key"), "-out", str(d / "st.pem"), "-subj", "/CN=bench"],
                   check=True, capture_output=True)
    common = "foreground = yes\npid =\nsslVersionMin = TLSv1.3\n"
    server = d / "st-server.conf"
    server.write_text(common + f"[s]\naccept = 127.0.0.1:{STUNNEL_SERVER}\nconnect = 127.0.0.1:{IPERF}\n"
                      f"cert = {d / 'st.pem'}\nkey = {d / 'st.key'}\n")
    client = d / "st-client.conf"
    client.write_text(common + f"[c]\nclient = yes\naccept = 127.0.0.1:{STUNNEL_CLIENT}\n"
                      f"connect = 127.0.0.1:{STUNNEL_SERVER}\n")
    return client, server


def run(seconds: int, repeat: int, report: Callable[[str], None],
        ugate_cmd: list[str] | None = None) -> dict[str, list[float]]:
    """Measure every row ``repeat`` times, interleaved; returns the samples by row name."""
    py = sys.executable
    gate_cmd = ugate_cmd or [py, "-m", "gate"]
    rows = ("direct", "ugate", "stunnel", "direct x4", "ugate x4", "stunnel x4", "setup direct ms", "setup ugate ms")
    samples: dict[str, list[float]] = {k: [] for k in rows}
    procs: list[subprocess.Popen[bytes]] = []
    echo = _echo_server()
    with tempfile.TemporaryDirectory(prefix="ugate-bench-mesh-") as tmp:
        d = Path(tmp)
        try:
            a_cfg, b_cfg = _configs(d, py)
            st_client, st_server = _stunnel_configs(d)

            def start(argv: list[str], port: int) -> None:
                proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(proc)
                wait_listening(port, proc)

            start(["iperf3", "-s", "-p", str(IPERF)], IPERF)
            start([*gate_cmd, "--config", str(b_cfg)], H2)
            start([*gate_cmd, "--config", str(a_cfg)], A_IPERF)
            start(["stunnel4", str(st_server)], STUNNEL_SERVER)
            start(["stunnel4", str(st_client)], STUNNEL_CLIENT)
            _latency_ms(A_ECHO)  # warm the tunnel up
            for r in range(repeat):
                for streams, suffix in ((1, ""), (4, " x4")):
                    for name, port in (("direct", IPERF), ("ugate", A_IPERF), ("stunnel", STUNNEL_CLIENT)):
                        got = _iperf(port, seconds, streams)
                        if got is None:  # a failed run is reported, not counted as 0 in the median
                            report(f"  !! iperf3 through {name + suffix} failed in round {r + 1}")
                        else:
                            samples[name + suffix].append(got)
                samples["setup direct ms"].append(_latency_ms(ECHO))
                samples["setup ugate ms"].append(_latency_ms(A_ECHO))
                report(f"  mesh round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items() if v))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            echo.close()
    if os.geteuid() == 0:
        samples.update(run_udp(seconds, repeat, report, ugate_cmd))
    return samples


def _udp_pps(topo: netns.Topology, target: str, seconds: int) -> float | None:
    """Delivered packets/s of 1200-byte datagrams sent as fast as iperf3 can from the client namespace."""
    argv = ["iperf3", "-c", target, "-p", str(IPERF), "-t", str(seconds), "-u", "-l", "1200", "-b", "2G", "-J"]
    done = subprocess.run(topo.cmd("client", *argv), capture_output=True, text=True, timeout=seconds + 30)
    try:
        s = json.loads(done.stdout)["end"]["sum"]
        return float(s["packets"] - s["lost_packets"]) / float(s["seconds"])
    except (ValueError, KeyError):
        return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_udp(seconds: int, repeat: int, report: Callable[[str], None],
            ugate_cmd: list[str] | None = None) -> dict[str, list[float]]:
    """The UDP rows: kernel forwarding, then gate A (tproxy_udp, via B) started and stopped each round."""
    py = sys.executable
    gate_cmd = ugate_cmd or [py, "-m", "gate"]
    samples: dict[str, list[float]] = {"udp kernel pps": [], "udp mesh pps": []}
    netns.remove("ugbm")
    topo = netns.router("ugbm")
    server4 = topo.addr["server4"]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ugate-bench-mesh-udp-") as tmp:
        d = Path(tmp)
        try:
            def keygen(name: str) -> str:
                out = subprocess.run([py, "-m", "gate", "keygen", "--dir", str(d / name)], cwd=ROOT, check=True,
                                     capture_output=True, text=True).stdout
                return out.split()[1]

            keygen("a")
            id_b = keygen("b")
            quiet = {"level": "warning", "access": "off"}
            b = {"log": quiet, "mesh": {"identity": str(d / "b")},
                 "peers": [{"name": "a", "cert": str(d / "a" / "cert.pem"), "allow": [{"port": [IPERF]}]}],
                 "listeners": [{"name": "mesh", "kind": "h2", "listen": f"{server4}:{H2}"}],
                 "routes": [{"action": "direct"}]}
            a = {"log": quiet, "mesh": {"identity": str(d / "a")},
                 "peers": [{"name": "b", "address": f"{server4}:{H2}", "id": id_b}],
                 "listeners": [{"name": "t4", "kind": "tproxy", "listen": "0.0.0.0:15001"},
                               {"name": "u4", "kind": "tproxy_udp", "listen": "0.0.0.0:15002"}],
                 "capture": {"mode": "tproxy", "role": "router", "interfaces": ["lan0"], "apply": "auto"},
                 "routes": [{"via": "b"}]}
            (d / "a.yaml").write_text(json.dumps(a))
            (d / "b.yaml").write_text(json.dumps(b))

            def start(role: str, argv: list[str], port: int) -> subprocess.Popen[bytes]:
                proc = subprocess.Popen(topo.cmd(role, *argv), cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                procs.append(proc)
                deadline = time.monotonic() + 15
                while f":{port} " not in topo.run(role, "ss", "-Hltn"):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{argv!r} did not start listening on {port}")
                    time.sleep(0.05)
                return proc

            start("server", ["iperf3", "-s", "-p", str(IPERF)], IPERF)
            start("server", [*gate_cmd, "--config", str(d / "b.yaml")], H2)
            for r in range(repeat):
                samples["udp kernel pps"].append(_udp_pps(topo, server4, seconds) or 0)
                gate_a = start("gateway", [*gate_cmd, "--config", str(d / "a.yaml")], 15001)
                time.sleep(0.3)  # the capture rules are applied once the gate is ready
                samples["udp mesh pps"].append(_udp_pps(topo, server4, seconds) or 0)
                _stop(gate_a)
                report(f"  mesh udp round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()))
        finally:
            for proc in procs:
                _stop(proc)
            topo.remove()
    return samples
