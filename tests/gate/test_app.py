"""The process: SIGTERM drains open flows for a bounded time and exits 0; workers share ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from typing import Any

import pytest

from tests.conftest import free_port


def test_sigterm_lets_open_flows_finish(start_gate: Any, hash_echo: int) -> None:
    port = free_port()
    gate = start_gate([{"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{hash_echo}"}],
                      timeouts={"drain": 10})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"x" * 1000)
        time.sleep(0.2)
        gate.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert gate.alive()  # draining, not dead
        with socket.socket() as late:  # no new flows: the listener is closed
            assert late.connect_ex(("127.0.0.1", port)) != 0
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100).endswith(b" 1000")  # the open flow finished normally
    assert gate.proc.wait(5) == 0
    (record,) = gate.records()
    assert record["close"] == "eof" and record["bytes_up"] == 1000


def test_drain_is_bounded(start_gate: Any, hash_echo: int) -> None:
    port = free_port()
    gate = start_gate([{"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{hash_echo}"}],
                      timeouts={"drain": 0.5})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"never finished")
        time.sleep(0.2)
        started = time.monotonic()
        gate.proc.send_signal(signal.SIGINT)
        assert gate.proc.wait(5) == 0
        assert time.monotonic() - started < 3
    (record,) = gate.records()
    assert record["close"] == "shutdown"


def test_workers_share_the_port_and_are_replaced(start_gate: Any, http_origin: int) -> None:
    port = free_port()
    listener = {"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{http_origin}"}
    gate = start_gate([listener], workers=2)

    def ready_pids() -> list[int]:
        return [int(p) for p in re.findall(r"ugate ready: .*\(pid (\d+)\)", gate.stderr())]

    deadline = time.monotonic() + 10
    while len(ready_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = ready_pids()
    assert len(set(workers)) == 2 and gate.proc.pid not in workers
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /w HTTP/1.0\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
            assert answer.endswith(b"hello from %d /w\n" % http_origin)
    assert len(gate.wait_records(40)) == 40  # a record is written just after the client saw the close
    os.kill(workers[0], signal.SIGKILL)
    while len(ready_pids()) < 3 and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    assert len(ready_pids()) == 3  # a replacement started
    assert gate.stop() == 0
    assert len(gate.records()) == 40


def _ready_pids(gate: Any, count: int) -> list[int]:
    deadline = time.monotonic() + 10
    while len(pids := [int(p) for p in re.findall(r"ugate ready: .*\(pid (\d+)\)", gate.stderr())]) < count:
        assert time.monotonic() < deadline, gate.stderr()
        time.sleep(0.05)
    return pids


def _fetch(port: int, path: bytes = b"/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET " + path + b" HTTP/1.0\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    return answer


def _rotate(gate: Any, sig: int, workers: int) -> Any:
    """What logrotate does: rename the log, signal the gate; wait until every process re-opened it."""
    rotated = gate.access_path.with_suffix(".1")
    gate.access_path.rename(rotated)
    before = gate.stderr().count("access log re-opened")
    gate.proc.send_signal(sig)
    deadline = time.monotonic() + 5
    while gate.stderr().count("access log re-opened") < before + workers:
        assert gate.alive() and time.monotonic() < deadline, gate.stderr()
        time.sleep(0.02)
    return rotated


@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGHUP, 1), (signal.SIGUSR1, 1), (signal.SIGHUP, 2)],
                         ids=["sighup", "sigusr1", "sighup-workers"])
def test_sighup_reopens_the_access_log_and_never_stops(start_gate: Any, http_origin: int, sig: int,
                                                       workers: int) -> None:
    port = free_port()
    listener = {"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{http_origin}"}
    gate = start_gate([listener], workers=workers)
    pids = _ready_pids(gate, workers)
    for _ in range(4):
        assert _fetch(port, b"/old").endswith(b"/old\n")
    assert len(gate.wait_records(4)) == 4
    rotated = _rotate(gate, sig, workers)
    for _ in range(20):  # SO_REUSEPORT spreads these over every worker
        assert _fetch(port, b"/new").endswith(b"/new\n")
    records = gate.wait_records(20)
    assert len(records) == 20 and all(r["bytes_down"] > 0 for r in records)  # in a new file at the same path
    assert len(rotated.read_text().splitlines()) == 4  # nothing more went to the renamed one
    assert gate.alive() and _ready_pids(gate, workers) == pids  # the same processes, still serving
    assert gate.stop() == 0


def test_workers_end_with_their_supervisor(start_gate: Any, http_origin: int) -> None:
    """kill -9 of the supervisor: the kernel signals the workers (PR_SET_PDEATHSIG), and they exit."""
    port = free_port()
    listener = {"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{http_origin}"}
    gate = start_gate([listener], workers=2)
    workers = _ready_pids(gate, 2)
    assert _fetch(port).endswith(b"/\n")

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended, unreaped
        except FileNotFoundError:
            return False

    gate.proc.send_signal(signal.SIGKILL)
    gate.proc.wait()
    deadline = time.monotonic() + 3
    while any(running(pid) for pid in workers):
        assert time.monotonic() < deadline, [pid for pid in workers if running(pid)]
        time.sleep(0.05)
    with socket.socket() as late:
        assert late.connect_ex(("127.0.0.1", port)) != 0  # nobody serves the port any more
