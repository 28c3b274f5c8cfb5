"""Zero-downtime upgrades and the service manager: sd_notify read from a real NOTIFY_SOCKET, the handoff
of listening sockets to a new process (--handoff) and socket activation across a restart, each with a
loop of connections running through it: none may be refused, reset or left unanswered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gate.handoff import Pool, from_systemd
from gate.sdnotify import Notifier, message, watchdog_interval
from tests.conftest import ROOT, free_port

# -- sd_notify ------------------------------------------------------------------------------------


def test_watchdog_interval_is_half_and_only_for_us() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}, pid=7) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"}, pid=7) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_interval({}, pid=7) is None


def test_notifier_without_socket_does_nothing() -> None:
    notifier = Notifier("")
    assert not notifier.enabled and not notifier.ready() and not notifier.watchdog()


def test_notifier_abstract_socket() -> None:
    name = f"ugate-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(b"\0" + name.encode())
        notifier = Notifier("@" + name)
        assert notifier.stopping()
        assert manager.recv(4096) == message(STOPPING=1) == b"STOPPING=1"
        notifier.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def _write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _config(port: int, origin: int, access: Path) -> dict[str, Any]:
    return {"log": {"level": "info", "access": str(access)}, "timeouts": {"drain": 5},
            "listeners": [{"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{origin}"}],
            "routes": [{"action": "direct"}]}


def test_sd_notify_ready_reloading_watchdog_stopping(tmp_path: Path, http_origin: int) -> None:
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(10)
    config = _write_config(tmp_path / "gate.yaml", _config(free_port(), http_origin, tmp_path / "access.log"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    err = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gate", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
        def next_message(*skip: str) -> dict[str, str]:
            while True:
                fields = _fields(manager.recv(4096))
                if not set(fields) <= set(skip):
                    return fields

        ready = next_message("WATCHDOG")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        pings = [next_message() for _ in range(3)]  # every 0.2 s: half of WATCHDOG_USEC
        assert all(p == {"WATCHDOG": "1"} for p in pings)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = next_message("WATCHDOG")
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        after = next_message("WATCHDOG")
        assert after["READY"] == "1" and after["STATUS"].startswith("reload ok")
        proc.send_signal(signal.SIGTERM)
        assert next_message("WATCHDOG") == {"STOPPING": "1"}
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        manager.close()


# -- a connect loop ------------------------------------------------------------------------------


@dataclass
class ConnectLoop:
    """Clients that open a connection, send a request and read the whole answer, again and again."""

    port: int
    clients: int = 8
    done: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _one(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=20) as s:
                    s.sendall(b"GET /loop HTTP/1.0\r\n\r\n")
                    answer = b""
                    while chunk := s.recv(4096):
                        answer += chunk
                if not answer.endswith(b"/loop\n"):
                    raise OSError(f"answer cut short: {answer[-40:]!r}")
                with self._lock:
                    self.done += 1
            except OSError as e:
                with self._lock:
                    self.failures.append(repr(e))

    def __enter__(self) -> ConnectLoop:
        self._threads = [threading.Thread(target=self._one, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        target = self.done + count
        while self.done < target:
            assert time.monotonic() < deadline and not self.failures, self.failures[:5]
            time.sleep(0.01)

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def _wait_line(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text()
        time.sleep(0.02)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_handoff_upgrade_refuses_no_connection(tmp_path: Path, http_origin: int, hash_echo: int,
                                               procs: list[subprocess.Popen[bytes]]) -> None:
    port, echo_port = free_port(), free_port()
    handoff = str(tmp_path / "handoff.sock")

    def start(gen: int) -> tuple[subprocess.Popen[bytes], Path]:
        config = _config(port, http_origin, tmp_path / f"access{gen}.log")
        config["listeners"].append({"name": "echo", "kind": "forward", "listen": f"127.0.0.1:{echo_port}",
                                    "to": f"127.0.0.1:{hash_echo}"})
        path = _write_config(tmp_path / f"gate{gen}.yaml", config)
        err = tmp_path / f"stderr{gen}"
        proc = subprocess.Popen([sys.executable, "-m", "gate", "--config", str(path), "run", "--handoff", handoff],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err.open("wb"))
        procs.append(proc)
        _wait_line(err, "ugate ready", proc)
        return proc, err

    old, _ = start(0)
    long_flow = socket.create_connection(("127.0.0.1", echo_port), timeout=10)
    long_flow.sendall(b"x" * 1000)
    with ConnectLoop(port) as loop:
        loop.wait_for(50)
        for gen in (1, 2):  # two upgrades in a row: the new gate serves the handoff path for the next one
            new, err = start(gen)
            assert "took 2 listening sockets over" in err.read_text()
            if gen == 1:  # a flow the first gate opened goes on while it drains, to its normal end
                long_flow.sendall(b"y" * 24)
                long_flow.shutdown(socket.SHUT_WR)
                assert long_flow.recv(100).endswith(b" 1024")
            assert old.wait(15) == 0  # it drained and left
            loop.wait_for(50)
            old = new
    assert loop.failures == [] and loop.done >= 150
    assert len((tmp_path / "access2.log").read_text().splitlines()) > 0  # the last gate served some
    assert old.poll() is None
    old.send_signal(signal.SIGTERM)
    assert old.wait(15) == 0
    assert not os.path.exists(handoff)  # the last gate removed its own path
    long_flow.close()


def test_socket_activation_restart_refuses_no_connection(tmp_path: Path, http_origin: int,
                                                         procs: list[subprocess.Popen[bytes]]) -> None:
    """The test plays systemd: it holds the listening socket (a .socket unit) and restarts the service
    with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES; connections arriving while no gate runs wait in the backlog."""
    holder = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = holder.getsockname()[1]
    config = _write_config(tmp_path / "gate.yaml", _config(port, http_origin, tmp_path / "access.log"))
    launch = ('exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web '
              f'exec {sys.executable} -m gate --config {config}')

    def start(gen: int) -> subprocess.Popen[bytes]:
        err = tmp_path / f"stderr{gen}"
        proc = subprocess.Popen(["sh", "-c", launch], cwd=ROOT, stdin=holder.fileno(), stdout=subprocess.DEVNULL,
                                stderr=err.open("wb"))
        procs.append(proc)
        _wait_line(err, "ugate ready", proc)
        assert "socket activation: 1 listening sockets" in err.read_text()
        return proc

    gate = start(0)
    with ConnectLoop(port) as loop:
        loop.wait_for(30)
        for gen in (1, 2):  # systemctl restart: stop, then start
            gate.send_signal(signal.SIGTERM)
            assert gate.wait(15) == 0
            gate = start(gen)
            loop.wait_for(30)
    assert loop.failures == []
    gate.send_signal(signal.SIGTERM)
    assert gate.wait(15) == 0
    holder.close()


def test_from_systemd_matches_by_address_and_ignores_others() -> None:
    pool = Pool()
    assert from_systemd(pool, {"LISTEN_PID": "1", "LISTEN_FDS": "1"}, pid=2) == 0  # for another process
    assert from_systemd(pool, {}, pid=2) == 0
    assert len(pool) == 0


def test_handoff_to_a_gate_that_fails_leaves_the_old_one_serving(tmp_path: Path, http_origin: int,
                                                                 procs: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    handoff = str(tmp_path / "handoff.sock")
    busy = socket.create_server(("127.0.0.1", 0))  # the new gate's extra listener cannot bind here

    def launch(gen: int, config: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path]:
        path = _write_config(tmp_path / f"gate{gen}.yaml", config)
        err = tmp_path / f"stderr{gen}"
        proc = subprocess.Popen([sys.executable, "-m", "gate", "--config", str(path), "run", "--handoff", handoff],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err.open("wb"))
        procs.append(proc)
        return proc, err

    old, err = launch(0, _config(port, http_origin, tmp_path / "access0.log"))
    _wait_line(err, "ugate ready", old)
    broken = _config(port, http_origin, tmp_path / "access1.log")
    broken["listeners"].append({"name": "busy", "kind": "forward", "listen": f"127.0.0.1:{busy.getsockname()[1]}",
                                "to": f"127.0.0.1:{http_origin}"})
    with ConnectLoop(port, clients=4) as loop:
        loop.wait_for(20)
        new, new_err = launch(1, broken)
        assert new.wait(15) == 1 and "took 1 listening sockets over" in new_err.read_text()
        loop.wait_for(20)
        assert old.poll() is None and "did not start" in err.read_text()
        # the old gate still serves the handoff path: a sound successor takes over
        again, again_err = launch(2, _config(port, http_origin, tmp_path / "access2.log"))
        _wait_line(again_err, "ugate ready", again)
        assert old.wait(15) == 0
        loop.wait_for(20)
    assert loop.failures == []
    again.send_signal(signal.SIGTERM)
    assert again.wait(15) == 0
    busy.close()
