"""UDP over the mesh on loopback, WebRTC against HTTP/2: 1200-byte datagrams through SOCKS5 UDP ASSOCIATE
on gate A, routed via gate B, to a sink behind B that counts them.

Rows (delivered packets/s; the sender and sink of scripts/bench_socks_udp.py, a process each, the
sender as fast as it can, or paced at ``--pps``): ``udp webrtc`` (A's peer b with ``transports:
[webrtc]``: one unordered data channel without retransmissions) and ``udp h2`` (a second gate A2
with ``transports: [h2]``: one CONNECT-UDP stream). The peer connection and the tunnel are warmed up
first. Rounds interleaved; medians. A flood measures how the gate sheds load (it reads the client
socket as fast as it can and drops past its bounds, which starves aiortc's many small steps per
message of loop time); a paced rate below capacity should arrive whole. Standalone:
``python3 scripts/bench_webrtc_udp.py --seconds 3 --repeat 1 [--pps 1000]``; ``run`` is what a bench
part calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_socks_udp  # noqa: E402
from bench_mesh import wait_listening  # noqa: E402

H2, A_SOCKS, A2_SOCKS = 16408, 16401, 16402
ROWS = {"udp webrtc": A_SOCKS, "udp h2": A2_SOCKS}


def _configs(d: Path, py: str) -> list[tuple[Path, int]]:
    """B, A (webrtc) and A2 (h2) configs, with the port to wait for each."""
    def keygen(name: str) -> str:
        out = subprocess.run([py, "-m", "gate", "keygen", "--dir", str(d / name)], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        return out.split()[1]

    keygen("a")
    keygen("a2")
    id_b = keygen("b")
    quiet = {"level": "warning", "access": "off"}
    allow = [{"dst": ["127.0.0.1/32"], "port": [bench_socks_udp.SINK]}]
    b = {"log": quiet, "mesh": {"identity": str(d / "b")},
         "peers": [{"name": "a", "cert": str(d / "a" / "cert.pem"), "allow": allow, "transports": ["webrtc"]},
                   {"name": "a2", "cert": str(d / "a2" / "cert.pem"), "allow": allow}],
         "listeners": [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{H2}"}], "routes": [{"action": "direct"}]}

    def gate_a(name: str, port: int, transports: list[str]) -> dict[str, object]:
        return {"log": quiet, "mesh": {"identity": str(d / name)},
                "peers": [{"name": "b", "address": f"127.0.0.1:{H2}", "id": id_b, "transports": transports}],
                "listeners": [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{port}"}],
                "routes": [{"via": "b"}]}

    configs = [("b", b, H2), ("a", gate_a("a", A_SOCKS, ["webrtc"]), A_SOCKS),
               ("a2", gate_a("a2", A2_SOCKS, ["h2"]), A2_SOCKS)]
    for name, config, _ in configs:
        (d / f"{name}.yaml").write_text(json.dumps(config))
    return [(d / f"{name}.yaml", port) for name, _, port in configs]


def _one(seconds: int, port: int, pps: int) -> tuple[float, float]:
    if not pps:
        return bench_socks_udp._one(seconds, port)
    counter = subprocess.Popen([sys.executable, bench_socks_udp.__file__, "--sink"], stdout=subprocess.PIPE, text=True)
    assert counter.stdout is not None
    counter.stdout.readline()  # "ready"
    sender = subprocess.run([sys.executable, __file__, "--paced", str(seconds), "--via", str(port), "--pps", str(pps)],
                            capture_output=True, text=True, timeout=seconds + 30)
    out, _ = counter.communicate(timeout=40)
    sent = int(sender.stdout.split()[0]) if sender.stdout.split() else 0
    return int(out.split()[-1]) / seconds, sent / seconds


def run(seconds: int, repeat: int, report: Callable[[str], None], ugate_cmd: list[str] | None = None,
        pps: int = 0) -> dict[str, list[float]]:
    """Measure every row ``repeat`` times, interleaved; returns the samples by row name (the offered
    load as "<row> sent")."""
    py = sys.executable
    gate_cmd = ugate_cmd or [py, "-m", "gate"]
    samples: dict[str, list[float]] = {k: [] for row in ROWS for k in (row, f"{row} sent")}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ugate-bench-webrtc-udp-") as tmp:
        try:
            for config, port in _configs(Path(tmp), py):
                procs.append(subprocess.Popen([*gate_cmd, "--config", str(config)], cwd=ROOT,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                wait_listening(port, procs[-1], timeout=20)
            for port in ROWS.values():
                bench_socks_udp._one(1, port)  # the peer connection (ICE, DTLS, SCTP) and the tunnel up
            for r in range(repeat):
                for row, port in ROWS.items():
                    delivered, sent = _one(seconds, port, pps)
                    samples[row].append(delivered)
                    samples[f"{row} sent"].append(sent)
                report(f"  webrtc udp round {r + 1}: " + ", ".join(
                    f"{row} {samples[row][-1]:,.0f} of {samples[row + ' sent'][-1]:,.0f} pps" for row in ROWS))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pps", type=int, default=0, help="pace the sender (default: as fast as it can)")
    parser.add_argument("--paced", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--via", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paced:
        bench_socks_udp.send(args.paced, args.via, args.pps)
        return 0
    samples = run(args.seconds, args.repeat, lambda line: print(line, file=sys.stderr, flush=True), pps=args.pps)
    for row in ROWS:
        print(f"{row:<12} {statistics.median(samples[row]):>10,.0f} delivered pps "
              f"(sent {statistics.median(samples[row + ' sent']):,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
