"""Limits: max_flows pauses accepting (the backlog waits), and running out of descriptors makes accept
back off and recover instead of killing the gateway."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from typing import Any

from tests.conftest import ROOT, free_port


def is_refused(port: int) -> bool:
    """A new connection is reset (or closed) by the gate at once. On a busy machine the reset can come
    before connect() returns to us, which then raises it."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionResetError:
        return True
    with s:
        s.settimeout(2)
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True


def exchange(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := s.recv(4096):
        answer += chunk
    return answer


def test_max_flows_holds_further_clients_in_the_backlog(start_gate: Any, hash_echo: int) -> None:
    port = free_port()
    gate = start_gate([{"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}",
                        "to": f"127.0.0.1:{hash_echo}", "max_flows": 2}])
    first = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    time.sleep(0.3)
    third = socket.create_connection(("127.0.0.1", port), timeout=5)  # completes in the kernel backlog
    third.sendall(b"abc")
    third.shutdown(socket.SHUT_WR)
    third.settimeout(0.5)
    try:
        early = third.recv(100)
    except TimeoutError:
        early = None
    assert early is None  # not served while two flows are open
    assert exchange(first[0], b"x").endswith(b" 1")
    third.settimeout(5)
    assert third.recv(100).endswith(b" 3")  # served as soon as a slot freed
    for s in (first[1], third):
        s.close()
    assert gate.alive()


def test_descriptor_exhaustion_backs_off_and_recovers(start_gate: Any, http_origin: int) -> None:
    port = free_port()
    gate = start_gate([{"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}",
                        "to": f"127.0.0.1:{http_origin}"}])
    pid = gate.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (gate.fd_count() + 6, hard))
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    deadline = time.monotonic() + 5
    while "accept failed" not in gate.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "accept failed (Too many open files)" in gate.stderr()
    assert gate.alive()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    for c in clients:
        c.close()
    url = f"http://127.0.0.1:{port}/after"
    got = subprocess.run(["curl", "-sf", "--max-time", "10", "--retry", "3", url], capture_output=True)
    assert got.stdout == f"hello from {http_origin} /after\n".encode()


def test_h2_listener_backs_off_on_descriptor_exhaustion(start_gate: Any, tmp_path: Any) -> None:
    """The h2 listener shares the accept loop: out of descriptors it backs off instead of spinning (it
    logged 121,498 warnings in 2 s once), and serves again when descriptors are back."""
    subprocess.run([sys.executable, "-m", "gate", "keygen", "--dir", str(tmp_path / "b")], cwd=ROOT, check=True,
                   capture_output=True)
    port = free_port()
    gate = start_gate([{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{port}"}],
                      mesh={"identity": str(tmp_path / "b"), "ca": str(tmp_path / "b" / "cert.pem")})
    pid = gate.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (gate.fd_count() + 4, hard))
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    time.sleep(2.5)
    warnings = gate.stderr().count("accept failed (Too many open files)")
    assert 1 <= warnings <= 10, gate.stderr()[-2000:]
    assert gate.alive()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    for c in clients:
        c.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as late:
        late.sendall(b"not TLS\r\n\r\n")
        late.settimeout(5)
        try:
            assert late.recv(100) == b""  # accepted, and the TLS handshake refused it
        except ConnectionResetError:
            pass
    deadline = time.monotonic() + 5
    while "gate at 127.0.0.1" not in gate.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "refused" in gate.stderr().split("accept failed")[-1]


def test_one_source_of_idle_handshakes_does_not_lock_the_others_out(start_gate: Any, hash_echo: int) -> None:
    """Once, 4,096 idle handshakes from one source took every slot until the handshake timeout. Now one
    address holds at most max_flows_per_source (default 7/8 of max_flows): the others are still served."""
    port = free_port()
    gate = start_gate([{"name": "s", "kind": "socks5", "listen": f"127.0.0.1:{port}", "max_flows": 40}])
    hogs, reset = [], 0
    for _ in range(40):  # say nothing
        try:
            hogs.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except ConnectionResetError:  # reset before connect() returned to us (a busy machine)
            reset += 1
    deadline = time.monotonic() + 3
    while "max_flows_per_source" not in gate.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    for s in hogs:
        s.settimeout(0.5)
        try:
            s.recv(1)
        except ConnectionResetError:
            reset += 1
        except TimeoutError:
            pass
    assert reset == 5, reset  # 35 held (7/8 of 40), the rest reset at once
    other = socket.socket()
    other.bind(("127.0.0.2", 0))  # another source
    other.settimeout(2)
    other.connect(("127.0.0.1", port))
    other.sendall(b"\x05\x01\x00")
    assert other.recv(2) == b"\x05\x00"  # served now, not after the hogs' handshake timeout
    other.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + hash_echo.to_bytes(2, "big"))
    assert other.recv(10)[1] == 0
    other.close()
    for s in hogs:
        s.close()


def test_max_flows_per_source_is_configurable(start_gate: Any) -> None:
    port = free_port()
    start_gate([{"name": "s", "kind": "socks5", "listen": f"127.0.0.1:{port}", "max_flows_per_source": 3}])
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    time.sleep(0.2)
    assert is_refused(port)
    held[0].close()  # a slot of this source frees: its next connection is served
    time.sleep(0.2)
    again = socket.create_connection(("127.0.0.1", port), timeout=5)
    again.sendall(b"\x05\x01\x00")
    again.settimeout(2)
    assert again.recv(2) == b"\x05\x00"
    for s in (*held[1:], again):
        s.close()


def test_pending_handshakes_per_source_are_bounded_apart_from_routed_flows(start_gate: Any, hash_echo: int) -> None:
    """A source may hold max_handshakes_per_source connections that are not routed yet; past that its
    new connections are reset while another source is served, and once its handshakes complete (the
    flows are relayed) it may open more, though its routed flows stay open."""
    port = free_port()
    gate = start_gate([{"name": "s", "kind": "socks5", "listen": f"127.0.0.1:{port}",
                        "max_handshakes_per_source": 3}])
    pending = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    time.sleep(0.2)
    assert is_refused(port)
    deadline = time.monotonic() + 3
    while "3 pending handshakes (max_handshakes_per_source)" not in gate.stderr():
        assert time.monotonic() < deadline, gate.stderr()
        time.sleep(0.05)
    other = socket.socket()
    other.bind(("127.0.0.2", 0))
    other.settimeout(2)
    other.connect(("127.0.0.1", port))
    other.sendall(b"\x05\x01\x00")
    assert other.recv(2) == b"\x05\x00"
    other.close()
    connect = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + hash_echo.to_bytes(2, "big")
    for s in pending:  # each handshake completes: three routed, relayed flows of this source
        s.sendall(b"\x05\x01\x00" + connect)
        assert s.recv(2) == b"\x05\x00" and s.recv(10)[1] == 0
    more = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    for s in more:
        s.settimeout(2)
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
    for s in (*pending, *more):
        s.close()
