"""Shared fixtures: a real ugate process per test, and real servers to proxy to.

Servers run in threads of the test process (Python's http.server, a hash-echo TCP server) or as
processes (openssl s_server); ugate always runs as its own process, started from a YAML config.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@dataclass
class Gate:
    """A running ugate process."""

    proc: subprocess.Popen[bytes]
    config: dict[str, Any]
    access_path: Path
    stderr_path: Path

    def port(self, name: str) -> int:
        for spec in self.config["listeners"]:
            if spec["name"] == name:
                return int(spec["listen"].rsplit(":", 1)[1])
        raise KeyError(name)

    def records(self) -> list[dict[str, Any]]:
        if not self.access_path.exists():
            return []
        return [json.loads(line) for line in self.access_path.read_text().splitlines() if line.strip()]

    def wait_records(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(recs := self.records()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return recs

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def start_gate(tmp_path: Path) -> Iterator[Any]:
    """``start_gate(listeners, routes=..., **top)`` starts ugate and waits for every listener."""
    gates: list[Gate] = []

    def start(listeners: list[dict[str, Any]], routes: list[dict[str, Any]] | None = None,
              netns: str | None = None, **top: Any) -> Gate:
        access = tmp_path / f"access{len(gates)}.log"
        config: dict[str, Any] = {
            "log": {"level": "debug", "access": str(access)},
            "timeouts": {"handshake": 5, "connect": 5, "idle": 60, "drain": 2},
            "listeners": listeners,
            "routes": routes if routes is not None else [{"action": "direct"}],
        }
        config.update(top)
        path = tmp_path / f"gate{len(gates)}.yaml"
        path.write_text(yaml.safe_dump(config))
        err = tmp_path / f"gate{len(gates)}.stderr"
        prefix = ["ip", "netns", "exec", netns] if netns else []
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "gate", "--config", str(path)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err.open("wb"),
        )
        gate = Gate(proc, config, access, err)
        gates.append(gate)
        # Wait for the ready line rather than probing the ports: a probe would be a flow of its own.
        deadline = time.monotonic() + 20  # python-iptables takes ~9 s to apply a rule set on a loaded machine
        while "ugate ready" not in gate.stderr():
            if not gate.alive() or time.monotonic() > deadline:
                raise AssertionError(f"ugate did not start:\n{gate.stderr()}")
            time.sleep(0.02)
        return gate

    yield start
    for gate in gates:
        if gate.alive():
            gate.stop()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-s", "--max-time", "20", *args], capture_output=True)


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose accept queue is full and never drained: SYNs are dropped, so connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    for s in fillers:
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
    yield int(listener.getsockname()[1])
    for s in [*fillers, listener]:
        s.close()


# -- servers ---------------------------------------------------------------------------------------

# Several MB, odd size on purpose; seeded so that every import of this module agrees on it.
PAYLOAD = random.Random(20261124).randbytes(5 * 1024 * 1024 + 123)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /payload -> PAYLOAD; GET /echo-headers -> request headers as JSON; POST /sha -> sha256 of body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: bytes, ctype: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/payload":
            self._send(PAYLOAD)
        elif self.path == "/echo-headers":
            self._send(json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(), "application/json")
        else:
            self._send(f"hello from {self.server.server_address[1]} {self.path}\n".encode(), "text/plain")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        while length:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            digest.update(chunk)
            length -= len(chunk)
        self._send(digest.hexdigest().encode(), "text/plain")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture(scope="session")
def http_origin() -> Iterator[int]:
    """A real HTTP/1.1 server on 127.0.0.1 (keep-alive), serving PAYLOAD and an upload hash."""
    server = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


@pytest.fixture(scope="session")
def http_origin2() -> Iterator[int]:
    """A second origin, to check keep-alive across origins."""
    server = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


def _hash_echo(listener: socket.socket) -> None:
    """Reads to EOF, then answers '<sha256> <length>' and closes: proves half-close is propagated."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return

        def serve(conn: socket.socket) -> None:
            with conn:
                digest, total = hashlib.sha256(), 0
                try:
                    while data := conn.recv(1 << 16):
                        digest.update(data)
                        total += len(data)
                    conn.sendall(f"{digest.hexdigest()} {total}".encode())
                except ConnectionResetError:
                    pass  # some tests reset flows on purpose

        threading.Thread(target=serve, args=(conn,), daemon=True).start()


@pytest.fixture(scope="session")
def hash_echo() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_hash_echo, args=(listener,), daemon=True).start()
    yield int(listener.getsockname()[1])
    listener.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and a payload file, made with openssl."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    (d / "payload.bin").write_bytes(PAYLOAD)
    return {"dir": d, "cert": d / "cert.pem", "key": d / "key.pem"}


@pytest.fixture(scope="session")
def https_origin(tls_files: dict[str, Path]) -> Iterator[int]:
    """openssl s_server -WWW serving files of tls_files['dir'] over HTTPS."""
    port = free_port()
    proc = subprocess.Popen(
        ["openssl", "s_server", "-quiet", "-WWW", "-accept", str(port), "-cert", str(tls_files["cert"]),
         "-key", str(tls_files["key"])],
        cwd=tls_files["dir"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port("127.0.0.1", port)
    yield port
    proc.terminate()
    proc.wait()


@pytest.fixture
def two_https(tls_files: dict[str, Path], tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Two openssl s_server -WWW origins whose who.txt says which one answered."""
    procs, ports = [], []
    for name in ("one", "two"):
        root = tmp_path / name
        root.mkdir()
        (root / "who.txt").write_text(f"{name}\n")
        port = free_port()
        procs.append(subprocess.Popen(
            ["openssl", "s_server", "-quiet", "-WWW", "-accept", str(port), "-cert", str(tls_files["cert"]),
             "-key", str(tls_files["key"])], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ports.append(port)
    for port in ports:
        wait_port("127.0.0.1", port)
    yield ports[0], ports[1]
    for proc in procs:
        proc.terminate()
        proc.wait()
