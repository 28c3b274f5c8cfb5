"""The `stun` listener: aioice (the ICE agent aiortc runs) gathers a server-reflexive candidate through
it; IPv6; anything but a Binding request gets no answer, and the gate serves on with no descriptor
growth."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

import aioice
import aioice.stun as stun

from tests.conftest import free_port


def start(start_gate: Any) -> tuple[Any, int]:
    port = free_port()
    gate = start_gate([{"name": "stun4", "kind": "stun", "listen": f"127.0.0.1:{port}"},
                       {"name": "stun6", "kind": "stun", "listen": f"[::1]:{port}"}])
    return gate, port


def ask(host: str, port: int, data: bytes | None = None, timeout: float = 2.0) -> bytes | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)) if data is None else data,
                 (host, port))
        try:
            return s.recv(2048)
        except TimeoutError:
            return None


def test_aioice_gathers_a_server_reflexive_candidate(start_gate: Any) -> None:
    _, port = start(start_gate)

    async def gather() -> list[Any]:
        connection = aioice.Connection(ice_controlling=True, stun_server=("127.0.0.1", port))
        try:
            await connection.gather_candidates()
            return list(connection.local_candidates)
        finally:
            await connection.close()

    candidates = asyncio.run(gather())
    assert [c for c in candidates if c.type == "srflx"], candidates


def test_ipv6_and_the_requesters_address(start_gate: Any) -> None:
    _, port = start(start_gate)
    for host in ("127.0.0.1", "::1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.bind((host, 0))
            request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
            s.sendto(bytes(request), (host, port))
            answer = stun.parse_message(s.recv(2048))
            assert answer.transaction_id == request.transaction_id
            assert answer.attributes["XOR-MAPPED-ADDRESS"] == s.getsockname()[:2]


def test_anything_else_gets_no_answer_and_the_gate_serves_on(start_gate: Any) -> None:
    gate, port = start(start_gate)
    assert ask("127.0.0.1", port) is not None
    before = gate.fd_count()
    others = [b"", b"\x00", b"GET / HTTP/1.1\r\n\r\n", bytes(stun.Message(stun.Method.BINDING, stun.Class.INDICATION)),
              bytes(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)),
              bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))[:19], b"\x00\x01" + bytes(4000)]
    for data in others:
        assert ask("127.0.0.1", port, data, timeout=0.3) is None, data
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(2000):
            s.sendto(bytes([i % 256]) * (i % 64), ("127.0.0.1", port))
    # a request right behind the burst may find the socket's queue full (a loaded machine): as a STUN
    # client does, ask again
    answered = next((i + 1 for i in range(5) if ask("127.0.0.1", port, timeout=1) is not None), None)
    assert answered is not None
    assert gate.fd_count() == before
    assert gate.stop() == 0
    deadline = time.monotonic() + 3
    while "Binding requests answered" not in gate.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    counted = re.search(r"stun4: (\d+) Binding requests answered", gate.stderr())
    assert counted is not None and 2 <= int(counted.group(1)) <= 1 + answered, gate.stderr()
    assert "Traceback" not in gate.stderr()
