"""Interceptors (a route's ``intercept: module:function``): they see every chunk both ways and may change
or drop it; an exception resets that flow only; bad references are config errors; the example module
logs first lines. Real sockets and curl through a ugate process."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PAYLOAD, PAYLOAD_SHA, ROOT, free_port


def forward(port: int, to: int) -> list[dict[str, Any]]:
    return [{"name": "fw", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{to}"}]


def intercepted(name: str) -> list[dict[str, Any]]:
    return [{"name": "seen", "action": "direct", "intercept": f"tests.e2e.interceptors:{name}"}]


def answer(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_an_interceptor_sees_every_chunk_and_changes_answers(start_gate: Any, hash_echo: int, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("UGATE_TEST_EVENTS", str(events))
    port = free_port()
    gate = start_gate(forward(port, hash_echo), routes=intercepted("shout"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(PAYLOAD)
        s.shutdown(socket.SHUT_WR)
        assert answer(s) == f"{PAYLOAD_SHA} {len(PAYLOAD)}".upper().encode()
    (record,) = gate.wait_records(1)
    assert record["path"] == "copy" and record["close"] == "eof" and record["bytes_up"] == len(PAYLOAD)
    seen = [json.loads(line) for line in events.read_text().splitlines()]
    assert seen[0]["kind"] == "open" and seen[-1] == {"kind": "close", "flow": seen[0]["flow"], "rule": "seen",
                                                      "bytes": 0, "reason": "eof"}
    assert sum(e["bytes"] for e in seen if e["kind"] == "up") == len(PAYLOAD)
    assert any(e["kind"] == "down" for e in seen)


def test_an_exception_resets_that_flow_only(start_gate: Any, hash_echo: int) -> None:
    port = free_port()
    gate = start_gate(forward(port, hash_echo), routes=intercepted("boom"))
    calm = socket.create_connection(("127.0.0.1", port), timeout=10)
    calm.sendall(b"hello ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as loud:
        loud.sendall(b"boom")
        with pytest.raises(ConnectionResetError):
            answer(loud)
    calm.sendall(b"world")
    calm.shutdown(socket.SHUT_WR)
    assert answer(calm) == f"{hashlib.sha256(b'hello world').hexdigest()} 11".encode()
    calm.close()
    records = gate.wait_records(2)
    failed = next(r for r in records if r["close"] == "intercept error")
    assert failed["detail"] == "RuntimeError: boom seen"
    assert sum(r["close"] == "eof" for r in records) == 1
    assert gate.alive()


def test_dropped_chunks_never_reach_the_upstream(start_gate: Any, hash_echo: int) -> None:
    port = free_port()
    start_gate(forward(port, hash_echo), routes=intercepted("no_secrets"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for part in (b"public ", b"secret words", b"more"):
            s.sendall(part)
            time.sleep(0.3)  # one chunk each
        s.shutdown(socket.SHUT_WR)
        assert answer(s) == f"{hashlib.sha256(b'public more').hexdigest()} 11".encode()


@pytest.mark.parametrize("function", ["fails_to_open", "wrong_type"])
def test_a_failing_or_wrong_interceptor_resets_the_flow_and_the_gate_serves_on(start_gate: Any, hash_echo: int,
                                                                              function: str) -> None:
    port = free_port()
    gate = start_gate(forward(port, hash_echo), routes=intercepted(function))
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(b"data")
                assert answer(s) == b""
            except ConnectionResetError:
                pass  # the reset arrives as an error on a busy machine: either way nothing got through
    records = gate.wait_records(3)
    assert all(r["close"] == "intercept error" for r in records), records
    assert gate.alive()


@pytest.mark.parametrize(("intercept", "action", "problem"), [
    ("nosuch.module:fn", "direct", "routes[0].intercept: cannot import nosuch"),
    ("tests.e2e.interceptors:missing", "direct", "has no function 'missing'"),
    ("tests.e2e.interceptors", "direct", "is not module:function"),
    ("tests.e2e.interceptors:shout", "reject", "not with action reject"),
])
def test_bad_references_are_config_errors(tmp_path: Path, intercept: str, action: str, problem: str) -> None:
    config = {"listeners": [{"name": "fw", "kind": "forward", "listen": "127.0.0.1:1", "to": "127.0.0.1:2"}],
              "routes": [{"action": action, "intercept": intercept}]}
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "gate", "check", "--config", str(tmp_path / "gate.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and problem in done.stderr, done.stderr


def test_the_example_module_logs_first_lines(start_gate: Any, http_origin: int) -> None:
    port = free_port()
    gate = start_gate(forward(port, http_origin), routes=[
        {"action": "direct", "intercept": "configs.interceptors.audit:first_lines"}])
    body = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/payload"], capture_output=True, check=True).stdout
    assert hashlib.sha256(body).hexdigest() == PAYLOAD_SHA
    gate.wait_records(1)
    log = gate.stderr()
    assert "up: GET /payload HTTP/1.1" in log and "down: HTTP/1." in log and "ended: eof" in log
