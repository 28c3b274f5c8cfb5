"""The webrtc part of scripts/bench: one bulk TCP stream through gate A -> WebRTC data channel -> gate B,
on loopback, against stock aiortc and the HTTP/2 transport, in the same run.

Rows (MB/s, one stream, ``--mb`` MiB each): ugate over WebRTC with large SCTP packets (A's forward listener
routed ``via`` B with ``transports: [webrtc]``: on loopback the two gates agree on 16 KiB packets); ugate over
WebRTC at the standard packet size (a gate A3 started with UGATE_WEBRTC_MAX_PACKET=1189, so neither side
sends larger packets); stock aiortc (two plain aiortc processes, this script in ``--stock-answer`` and
``--stock-offer`` modes, one data channel, 16 KiB messages, signalled over a local TCP connection); ugate
over HTTP/2 (a second gate A2 with ``transports: [h2]``). Also the setup time of a new flow over a warm
peer connection (connect through A, one byte echoed by a server behind B, close; median ms) against the
same over HTTP/2. Rounds are interleaved; medians. Standalone: ``python3 scripts/bench_webrtc.py``.
"""

from __future__ import annotations

import argparse
import asyncio
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
sys.path.insert(0, str(ROOT / "scripts"))

from bench_mesh import wait_listening  # noqa: E402

SINK, ECHO, H2 = 15401, 15402, 16308
A_SINK, A_ECHO, A2_SINK, A2_ECHO, A3_SINK, A3_ECHO = 16301, 16302, 16311, 16312, 16321, 16322
STOCK_SIGNAL = 16320
STANDARD_PACKET = 1189  # aiortc's SCTP packet size (gate.mesh.webrtc.sctp_tuning.STANDARD_PACKET)
# The targets, against stock aiortc measured in the same run.
TARGET_STANDARD, TARGET_LARGE = 2.0, 5.0
LATENCY_SAMPLES = 100
MESSAGE = 16 << 10  # stock aiortc's sender: 16 KiB messages, paced by bufferedAmount


def _servers() -> list[socket.socket]:
    """A sink (reads to EOF, answers the byte count) and a one-byte echo, in threads."""
    sink = socket.create_server(("127.0.0.1", SINK), backlog=64)
    echo = socket.create_server(("127.0.0.1", ECHO), backlog=512)

    def serve(listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def drain(conn: socket.socket) -> None:
        with conn:
            total = 0
            while chunk := conn.recv(1 << 20):
                total += len(chunk)
            conn.sendall(str(total).encode())

    def one_byte(conn: socket.socket) -> None:
        with conn:
            data = conn.recv(16)
            if data:
                conn.sendall(data)

    threading.Thread(target=serve, args=(sink, drain), daemon=True).start()
    threading.Thread(target=serve, args=(echo, one_byte), daemon=True).start()
    return [sink, echo]


def _bulk_mbps(port: int, size: int) -> float | None:
    """MB/s of ``size`` bytes sent through ``port`` to the sink, until the sink has counted them all."""
    block = b"\0" * (1 << 20)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            started = time.perf_counter()
            for _ in range(size >> 20):
                s.sendall(block)
            s.shutdown(socket.SHUT_WR)
            got = s.recv(64)
            elapsed = time.perf_counter() - started
    except OSError:
        return None
    return size / elapsed / 1e6 if got == str(size).encode() else None


def _latency_ms(port: int) -> float:
    samples = []
    for _ in range(LATENCY_SAMPLES):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"x")
            s.recv(16)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _configs(d: Path, py: str) -> tuple[Path, Path, Path, Path]:
    def keygen(name: str) -> str:
        out = subprocess.run([py, "-m", "gate", "keygen", "--dir", str(d / name)], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        return out.split()[1]

    keygen("a")
    keygen("a2")
    keygen("a3")
    id_b = keygen("b")
    quiet = {"level": "warning", "access": "off"}
    allow = [{"port": [SINK, ECHO]}]
    b = {"log": quiet, "mesh": {"identity": str(d / "b")},
         "peers": [{"name": "a", "cert": str(d / "a" / "cert.pem"), "allow": allow, "transports": ["webrtc"]},
                   {"name": "a2", "cert": str(d / "a2" / "cert.pem"), "allow": allow},
                   {"name": "a3", "cert": str(d / "a3" / "cert.pem"), "allow": allow, "transports": ["webrtc"]}],
         "listeners": [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{H2}"}], "routes": [{"action": "direct"}]}

    def gate_a(name: str, sink: int, echo: int, transports: list[str]) -> dict[str, object]:
        return {"log": quiet, "mesh": {"identity": str(d / name)},
                "peers": [{"name": "b", "address": f"127.0.0.1:{H2}", "id": id_b, "transports": transports}],
                "listeners": [
                    {"name": "sink", "kind": "forward", "listen": f"127.0.0.1:{sink}", "to": f"127.0.0.1:{SINK}"},
                    {"name": "echo", "kind": "forward", "listen": f"127.0.0.1:{echo}", "to": f"127.0.0.1:{ECHO}"}],
                "routes": [{"via": "b"}]}

    for name, config in (("b", b), ("a", gate_a("a", A_SINK, A_ECHO, ["webrtc"])),
                         ("a2", gate_a("a2", A2_SINK, A2_ECHO, ["h2"])),
                         ("a3", gate_a("a3", A3_SINK, A3_ECHO, ["webrtc"]))):
        (d / f"{name}.yaml").write_text(json.dumps(config))
    return d / "a.yaml", d / "a2.yaml", d / "a3.yaml", d / "b.yaml"


# -- stock aiortc: two plain processes, one channel ----------------------------------------------------

async def _stock_answer() -> None:
    """Answer one offer from the signaling socket, count what the channel brings, report MB/s, exit."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    done = asyncio.get_running_loop().create_future()

    async def signal(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        offer = json.loads(await reader.readline())
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

        @pc.on("datachannel")
        def channel(ch: object) -> None:
            state = {"bytes": 0, "started": 0.0}

            @ch.on("message")  # type: ignore[attr-defined,untyped-decorator]
            def message(data: bytes | str) -> None:
                if isinstance(data, str):  # "end": the sender sent it all
                    elapsed = time.perf_counter() - state["started"]
                    writer.write(json.dumps({"mbps": state["bytes"] / elapsed / 1e6}).encode() + b"\n")
                    done.set_result(None)
                    return
                if not state["bytes"]:
                    state["started"] = time.perf_counter()
                state["bytes"] += len(data)

        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        writer.write(json.dumps({"sdp": pc.localDescription.sdp}).encode() + b"\n")
        await done
        await writer.drain()
        await pc.close()

    server = await asyncio.start_server(signal, "127.0.0.1", STOCK_SIGNAL)
    async with server:
        await done
        await asyncio.sleep(0.2)


async def _stock_offer(size: int) -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("bulk")
    opened = asyncio.Event()
    low = asyncio.Event()
    channel.on("open", opened.set)
    channel.bufferedAmountLowThreshold = 1 << 20
    channel.on("bufferedamountlow", low.set)
    await pc.setLocalDescription(await pc.createOffer())
    reader, writer = await asyncio.open_connection("127.0.0.1", STOCK_SIGNAL)
    writer.write(json.dumps({"sdp": pc.localDescription.sdp}).encode() + b"\n")
    await pc.setRemoteDescription(RTCSessionDescription(json.loads(await reader.readline())["sdp"], "answer"))
    await opened.wait()
    block = b"\0" * MESSAGE
    for _ in range(size // MESSAGE):
        channel.send(block)
        if channel.bufferedAmount > 4 << 20:
            low.clear()
            await low.wait()
    channel.send("end")
    print(json.loads(await reader.readline())["mbps"], flush=True)
    await pc.close()


def _stock_mbps(size: int) -> float | None:
    py = sys.executable
    me = str(Path(__file__).resolve())
    answer = subprocess.Popen([py, me, "--stock-answer"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(STOCK_SIGNAL, answer, timeout=20)
        done = subprocess.run([py, me, "--stock-offer", "--size", str(size)], capture_output=True, text=True,
                              timeout=300)
        return float(done.stdout.strip())
    except (RuntimeError, ValueError, subprocess.TimeoutExpired):
        return None
    finally:
        answer.terminate()
        answer.wait(10)


def run(mb: int, repeat: int, report: Callable[[str], None], ugate_cmd: list[str] | None = None
        ) -> dict[str, list[float]]:
    """Measure every row ``repeat`` times, interleaved; returns the samples by row name."""
    py = sys.executable
    gate_cmd = ugate_cmd or [py, "-m", "gate"]
    size = mb << 20
    rows = ("ugate webrtc large", "ugate webrtc", "stock aiortc", "ugate h2", "setup webrtc ms", "setup h2 ms")
    samples: dict[str, list[float]] = {k: [] for k in rows}
    procs: list[subprocess.Popen[bytes]] = []
    servers = _servers()
    with tempfile.TemporaryDirectory(prefix="ugate-bench-webrtc-") as tmp:
        try:
            a_cfg, a2_cfg, a3_cfg, b_cfg = _configs(Path(tmp), py)

            def start(argv: list[str], port: int, env: dict[str, str] | None = None) -> None:
                proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=None if env is None else {**os.environ, **env})
                procs.append(proc)
                wait_listening(port, proc, timeout=20)

            start([*gate_cmd, "--config", str(b_cfg)], H2)
            start([*gate_cmd, "--config", str(a_cfg)], A_SINK)
            start([*gate_cmd, "--config", str(a2_cfg)], A2_SINK)
            start([*gate_cmd, "--config", str(a3_cfg)], A3_SINK, {"UGATE_WEBRTC_MAX_PACKET": str(STANDARD_PACKET)})
            _latency_ms(A_ECHO)  # the peer connections up, and the tunnel
            _latency_ms(A2_ECHO)
            _latency_ms(A3_ECHO)
            for r in range(repeat):
                for name, measure in (("ugate webrtc large", lambda: _bulk_mbps(A_SINK, size)),
                                      ("ugate webrtc", lambda: _bulk_mbps(A3_SINK, size)),
                                      ("stock aiortc", lambda: _stock_mbps(size)),
                                      ("ugate h2", lambda: _bulk_mbps(A2_SINK, size))):
                    got = measure()
                    if got is None:
                        report(f"  !! {name} failed in round {r + 1}")
                    else:
                        samples[name].append(got)
                samples["setup webrtc ms"].append(_latency_ms(A_ECHO))
                samples["setup h2 ms"].append(_latency_ms(A2_ECHO))
                report(f"  webrtc round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items() if v))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for server in servers:
                server.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=32, help="MiB per bulk transfer (default 32)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--stock-answer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stock-offer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stock_answer:
        asyncio.run(_stock_answer())
        return 0
    if args.stock_offer:
        asyncio.run(_stock_offer(args.size))
        return 0
    samples = run(args.mb, args.repeat, lambda line: print(line, file=sys.stderr, flush=True))
    for row, values in samples.items():
        unit = "ms" if row.endswith("ms") else "MB/s"
        print(f"{row:<18} {statistics.median(values) if values else float('nan'):>10.2f} {unit}  ({len(values)} runs)")
    print("targets:")
    for line in target_lines(samples):
        print(line)
    return 0


def target_lines(samples: dict[str, list[float]]) -> list[str]:
    """The issue's two targets as PASS/FAIL lines (scripts/bench prints the same)."""
    def med(row: str) -> float | None:
        return statistics.median(samples[row]) if samples.get(row) else None

    stock = med("stock aiortc")
    lines = []
    for row, target, what in (("ugate webrtc", TARGET_STANDARD, "standard packet size"),
                              ("ugate webrtc large", TARGET_LARGE, "large packets negotiated, loopback")):
        ours = med(row)
        label = f"webrtc, one stream >= {target:g}x stock aiortc ({what})"
        if ours and stock:
            lines.append(f"  {'PASS' if ours / stock >= target else 'FAIL'}  {label}: {ours:.1f} / {stock:.1f} MB/s"
                         f" = {ours / stock:.2f}x")
        else:
            lines.append(f"  n/a   {label}: not measured")
    return lines


if __name__ == "__main__":
    sys.exit(main())
