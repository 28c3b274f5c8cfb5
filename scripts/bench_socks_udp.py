"""The socksudp part of scripts/bench: 1200-byte datagrams through SOCKS5 UDP ASSOCIATE, on loopback.

Rows (delivered packets/s at a sink that counts them): direct (the sender to the sink), through ugate's
``socks5`` listener, and through Debian's dante-server (danted, the peer that does the same; the row is
left out when it is not installed). The sender speaks as PySocks does (UDP ASSOCIATE naming its port,
then each datagram with the SOCKS UDP header to the relay), without PySocks' per-datagram overhead, and
sends as fast as it can for the run; sender and sink are processes of their own. Rounds interleaved;
medians. Also runnable alone: ``scripts/bench_socks_udp.py --seconds 3 --repeat 1``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_mesh import wait_listening  # noqa: E402

SINK, UGATE, DANTED = 15401, 16301, 16302
SIZE = 1200


def sink(port: int) -> None:
    """Count datagrams until 1 s passes without one (after the first); print the count."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", port))
    print("ready", flush=True)
    buf, count = bytearray(65536), 0
    s.settimeout(30)
    while True:
        try:
            s.recv_into(buf)
        except TimeoutError:
            break
        count += 1
        if count == 1:
            s.settimeout(1)
    print(count, flush=True)


def send(seconds: float, socks_port: int, pps: int = 0) -> None:
    """Send SIZE-byte datagrams to the sink for ``seconds``, through SOCKS5 UDP ASSOCIATE at
    ``socks_port`` (0: direct), as fast as it can or ``pps`` a second; print how many were sent."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    udp.bind(("127.0.0.1", 0))
    payload = b"x" * SIZE
    control = None
    if socks_port:
        control = socket.create_connection(("127.0.0.1", socks_port), timeout=5)
        control.sendall(b"\x05\x01\x00")
        assert control.recv(2) == b"\x05\x00"
        control.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00" + struct.pack("!H", udp.getsockname()[1]))
        reply = control.recv(10)
        assert reply[:2] == b"\x05\x00" and reply[3] == 1, reply
        relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
        udp.connect(relay)
        payload = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", SINK) + payload
    else:
        udp.connect(("127.0.0.1", SINK))
    sent, deadline = 0, time.monotonic() + seconds
    burst, due = (max(1, pps // 100), time.monotonic()) if pps else (256, 0.0)  # paced: a burst per 10 ms
    while time.monotonic() < deadline:
        if pps:
            due += burst / pps
            time.sleep(max(0.0, due - time.monotonic()))
        for _ in range(burst):
            try:
                udp.send(payload)
                sent += 1
            except OSError:  # ENOBUFS and the like: a full queue, as a NIC would drop
                pass
    print(sent, flush=True)
    time.sleep(0.2)  # let the last datagrams through before the association ends
    if control is not None:
        control.close()


def _one(seconds: int, socks_port: int) -> tuple[float, float]:
    """(delivered, sent) packets/s of one run."""
    me = [sys.executable, __file__]
    counter = subprocess.Popen([*me, "--sink"], stdout=subprocess.PIPE, text=True)
    assert counter.stdout is not None
    counter.stdout.readline()  # "ready"
    sender = subprocess.run([*me, "--send", str(seconds), "--via", str(socks_port)], capture_output=True,
                            text=True, timeout=seconds + 30)
    out, _ = counter.communicate(timeout=40)
    sent = int(sender.stdout.split()[0]) if sender.stdout.split() else 0
    return int(out.split()[-1]) / seconds, sent / seconds


def _danted_config(d: Path) -> Path:
    conf = d / "danted.conf"
    conf.write_text(f"""logoutput: {d / 'danted.log'}
internal: 127.0.0.1 port = {DANTED}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: udpassociate udpreply }}
""")
    return conf


def run(seconds: int, repeat: int, report: Callable[[str], None],
        ugate_cmd: list[str] | None = None) -> dict[str, list[float]]:
    """Measure every row ``repeat`` times, interleaved; returns the samples by row name (the rows'
    offered load as "<row> sent")."""
    gate_cmd = ugate_cmd or [sys.executable, "-m", "gate"]
    targets = {"direct": 0, "ugate": UGATE}
    if shutil.which("danted"):
        targets["danted"] = DANTED
    else:
        report("  socksudp: danted not installed (Debian dante-server): its row is left out")
    samples: dict[str, list[float]] = {k: [] for name in targets for k in (name, f"{name} sent")}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ugate-bench-socksudp-") as tmp:
        d = Path(tmp)
        try:
            config = {"log": {"level": "warning", "access": "off"},
                      "listeners": [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{UGATE}"}],
                      "routes": [{"action": "direct"}]}
            (d / "gate.yaml").write_text(json.dumps(config))
            procs.append(subprocess.Popen([*gate_cmd, "--config", str(d / "gate.yaml")], cwd=ROOT,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_listening(UGATE, procs[-1])
            if "danted" in targets:
                procs.append(subprocess.Popen(["danted", "-f", str(_danted_config(d)), "-N", "1"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                wait_listening(DANTED, procs[-1])
            for r in range(repeat):
                for name, port in targets.items():
                    delivered, sent = _one(seconds, port)
                    samples[name].append(delivered)
                    samples[f"{name} sent"].append(sent)
                got = (f"{n} {samples[n][-1]:,.0f} of {samples[n + ' sent'][-1]:,.0f} pps" for n in targets)
                report(f"  socksudp round {r + 1}: " + ", ".join(got))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--send", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--via", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        sink(SINK)
        return 0
    if args.send:
        send(args.send, args.via)
        return 0
    samples = run(args.seconds, args.repeat, lambda line: print(line, file=sys.stderr, flush=True))
    for name, values in samples.items():
        if not name.endswith(" sent") and values:
            values = sorted(values)
            print(f"{name:<8} {values[len(values) // 2]:>12,.0f} delivered pps (sent "
                  f"{sorted(samples[name + ' sent'])[len(values) // 2]:,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
