"""Garbage, truncated and slow handshakes on every listener: the protocol's error answer or a clean
close, the gateway keeps serving, and its descriptor count returns to the baseline."""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import time
from typing import Any

import pytest

from tests.conftest import free_port

GARBAGE = [
    b"\x00" * 64,
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(200),
    b"\x05\xff" + os.urandom(300),
    b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 2000,  # SOCKS4 user id without its NUL
    b"\x05\x01\x00\x05\x01\x00\x03\xff" + b"a" * 10,  # SOCKS5 domain longer than what follows
    b"CONNECT " + b"a" * 100000 + b" HTTP/1.1\r\n\r\n",
    os.urandom(4096),
]
TRUNCATED = [b"\x05", b"\x05\x01\x00\x05\x01", b"\x04\x01\x00", b"CONNECT example.test:443 HTTP/1.1\r\n", b"GET http://x"]


@pytest.fixture
def gate(start_gate: Any, http_origin: int) -> Any:
    ports = {"socks": free_port(), "http": free_port(), "fwd": free_port()}
    g = start_gate(
        [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{ports['socks']}"},
         {"name": "http", "kind": "http", "listen": f"127.0.0.1:{ports['http']}"},
         {"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{ports['fwd']}", "to": f"127.0.0.1:{http_origin}"}],
        timeouts={"handshake": 1, "connect": 2, "idle": 5, "drain": 1},
    )
    g.ports = ports
    g.origin = http_origin
    still_serving(g)  # warm up: the relay's pipe pool now holds its pipes, so baselines include them
    assert len(g.wait_records(3)) == 3  # records are written just after the client sees the close
    return g


def answer(port: int, data: bytes, close_write: bool = False, timeout: float = 5.0) -> bytes:
    """What the gateway says to ``data`` before it closes (b"" for a clean close, RST counts as close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if close_write:
                s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks) if "chunks" in locals() else b""


def still_serving(gate: Any) -> None:
    origin = f"http://127.0.0.1:{gate.origin}/alive"
    expected = f"hello from {gate.origin} /alive\n".encode()
    for args in (["--socks5-hostname", f"127.0.0.1:{gate.ports['socks']}"], ["-x", f"http://127.0.0.1:{gate.ports['http']}"]):
        got = subprocess.run(["curl", "-sf", "--max-time", "10", *args, origin], capture_output=True)
        assert got.stdout == expected, got
    got = subprocess.run(["curl", "-sf", "--max-time", "10", f"http://127.0.0.1:{gate.ports['fwd']}/alive"],
                         capture_output=True)
    assert got.stdout == expected


def settle_fds(gate: Any, baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (count := gate.fd_count()) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


@pytest.mark.parametrize("data", GARBAGE, ids=lambda d: d[:12].hex())
def test_garbage_gets_error_or_close(gate: Any, data: bytes) -> None:
    baseline = gate.fd_count()
    socks_answer = answer(gate.ports["socks"], data)
    # SOCKS answers only in SOCKS: nothing, or a short SOCKS reply
    assert len(socks_answer) <= 12, socks_answer
    http_answer = answer(gate.ports["http"], data)
    assert http_answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431", b"HTTP/1.1 408")), http_answer[:100]
    assert gate.alive()
    assert settle_fds(gate, baseline) <= baseline
    still_serving(gate)


@pytest.mark.parametrize("data", TRUNCATED, ids=lambda d: d[:12].hex())
def test_truncated_handshake_then_close(gate: Any, data: bytes) -> None:
    baseline = gate.fd_count()
    for port in (gate.ports["socks"], gate.ports["http"]):
        got = answer(port, data, close_write=True)
        assert got == b"" or got.startswith((b"HTTP/1.1 400", b"\x05", b"\x00")), got
    assert settle_fds(gate, baseline) <= baseline
    still_serving(gate)


def test_slow_handshakes_time_out_and_leak_nothing(gate: Any) -> None:
    baseline = gate.fd_count()
    logged = len(gate.records())
    slow = []
    for port, first in ((gate.ports["socks"], b"\x05"), (gate.ports["http"], b"GET http://x/ HTTP/1.1\r\n")):
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(first)
            slow.append((port, s))
    deadline = time.monotonic() + 3
    while gate.fd_count() < baseline + 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gate.fd_count() >= baseline + 100, gate.stderr()[-3000:]
    still_serving(gate)  # slow clients do not hold anyone else up
    for port, s in slow:
        s.settimeout(5)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        if port == gate.ports["http"]:
            assert data.startswith(b"HTTP/1.1 408"), data
        else:
            assert data == b""
        s.close()
    assert settle_fds(gate, baseline) <= baseline
    records = gate.wait_records(logged + 103)[logged:]  # 100 slow clients + 3 flows of still_serving
    closes = collections.Counter(r["close"] for r in records)
    assert closes["handshake timeout"] == 100, closes


def test_connect_and_close_storm(gate: Any) -> None:
    baseline = gate.fd_count()
    for _ in range(200):
        for port in gate.ports.values():
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
    assert settle_fds(gate, baseline) <= baseline
    still_serving(gate)


# -- the listeners that read first bytes: sni, mux, and a PROXY-protocol listener ----------------------

PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40  # a ClientHello cut short


@pytest.fixture
def sniffing_gate(start_gate: Any, http_origin: int, https_origin: int) -> Any:
    ports = {"sni": free_port(), "mux": free_port(), "pp": free_port()}
    g = start_gate(
        [{"name": "sni", "kind": "sni", "listen": f"127.0.0.1:{ports['sni']}", "port": https_origin},
         {"name": "mux", "kind": "mux", "listen": f"127.0.0.1:{ports['mux']}"},
         {"name": "pp", "kind": "forward", "listen": f"127.0.0.1:{ports['pp']}", "to": f"127.0.0.1:{http_origin}",
          "proxy_protocol_from": ["127.0.0.0/8"]}],
        timeouts={"handshake": 1, "connect": 2, "idle": 5, "drain": 1},
    )
    g.ports, g.origin, g.https_origin = ports, http_origin, https_origin
    sniffers_still_serve(g)
    assert len(g.wait_records(3)) == 3
    return g


def sniffers_still_serve(gate: Any) -> None:
    sni = subprocess.run(["curl", "-sfk", "--max-time", "10", "--resolve", f"localhost:{gate.ports['sni']}:127.0.0.1",
                          f"https://localhost:{gate.ports['sni']}/payload.bin"], capture_output=True)
    assert sni.returncode == 0 and len(sni.stdout) > 0, sni
    expected = f"hello from {gate.origin} /alive\n".encode()
    for args in (["--socks5-hostname", f"127.0.0.1:{gate.ports['mux']}", f"http://127.0.0.1:{gate.origin}/alive"],
                 ["--haproxy-protocol", f"http://127.0.0.1:{gate.ports['pp']}/alive"]):
        got = subprocess.run(["curl", "-sf", "--max-time", "10", *args], capture_output=True)
        assert got.stdout == expected, got


@pytest.mark.parametrize("data", GARBAGE, ids=lambda d: d[:12].hex())
def test_sniffing_listeners_close_on_garbage(sniffing_gate: Any, data: bytes) -> None:
    gate = sniffing_gate
    baseline = gate.fd_count()
    assert answer(gate.ports["sni"], data) == b""  # no TLS server name and no default: closed
    assert answer(gate.ports["pp"], data) == b""  # not a PROXY header from a trusted balancer: reset
    mux = answer(gate.ports["mux"], data)  # whatever it looked like, answered in that protocol, or closed
    assert mux == b"" or len(mux) <= 12 or mux.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), mux[:100]
    assert gate.alive()
    assert settle_fds(gate, baseline) <= baseline
    sniffers_still_serve(gate)


def test_sniffing_listeners_truncated_then_close(sniffing_gate: Any) -> None:
    gate = sniffing_gate
    baseline = gate.fd_count()
    for port, data in ((gate.ports["sni"], PARTIAL_HELLO), (gate.ports["mux"], PARTIAL_HELLO),
                       (gate.ports["mux"], b"\x05"), (gate.ports["pp"], b"PROXY TCP4 127.0.0.1")):
        assert answer(port, data, close_write=True) == b"", (port, data)
    assert settle_fds(gate, baseline) <= baseline
    sniffers_still_serve(gate)


def test_sniffing_listeners_slow_clients_time_out(sniffing_gate: Any) -> None:
    gate = sniffing_gate
    baseline = gate.fd_count()
    logged = len(gate.records())
    slow = []
    for port, first in ((gate.ports["sni"], PARTIAL_HELLO), (gate.ports["pp"], b"PROXY TCP4 ")):
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(first)
            slow.append(s)
    deadline = time.monotonic() + 3
    while gate.fd_count() < baseline + 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    sniffers_still_serve(gate)  # slow clients hold nobody else up
    for s in slow:
        s.settimeout(5)
        try:
            assert s.recv(4096) == b""  # closed after the handshake timeout (1 s), never answered
        except ConnectionResetError:
            pass
        s.close()
    assert settle_fds(gate, baseline) <= baseline
    records = gate.wait_records(logged + 63)[logged:]  # 60 slow clients + 3 flows of sniffers_still_serve
    closes = collections.Counter((r["close"], r["detail"]) for r in records)
    assert closes["refused", "no TLS server name (and no default)"] == 30, closes
    assert closes["handshake timeout", "no PROXY protocol header in time"] == 30, closes
