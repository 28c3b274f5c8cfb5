"""forward listener end to end: curl and raw sockets through it, splice and copy paths, error -> RST."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from typing import Any

import pytest

from tests.conftest import PAYLOAD, PAYLOAD_SHA, free_port


def upload_through(port: int, data: bytes) -> str:
    """Send ``data``, half-close, and read the hash-echo server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.mark.parametrize("relay", ["splice", "copy"])
def test_curl_download_and_half_closed_upload(start_gate: Any, http_origin: int, hash_echo: int, relay: str) -> None:
    web, echo = free_port(), free_port()
    gate = start_gate([
        {"name": "web", "kind": "forward", "listen": f"127.0.0.1:{web}", "to": f"127.0.0.1:{http_origin}",
         "relay": relay},
        {"name": "echo", "kind": "forward", "listen": f"127.0.0.1:{echo}", "to": f"127.0.0.1:{hash_echo}",
         "relay": relay},
    ])
    body = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{web}/payload"], capture_output=True, check=True).stdout
    assert hashlib.sha256(body).hexdigest() == PAYLOAD_SHA
    assert upload_through(echo, PAYLOAD) == f"{PAYLOAD_SHA} {len(PAYLOAD)}"
    records = gate.wait_records(2)
    by_listener = {r["listener"]: r for r in records}
    assert by_listener["echo"]["bytes_up"] == len(PAYLOAD)
    assert by_listener["echo"]["path"] == relay and by_listener["echo"]["close"] == "eof"
    assert by_listener["web"]["bytes_down"] > len(PAYLOAD)
    assert by_listener["web"]["dst"] == f"127.0.0.1:{http_origin}" and by_listener["web"]["action"] == "direct"


def test_route_upstream_overrides_to(start_gate: Any, http_origin: int) -> None:
    port = free_port()
    gate = start_gate(
        [{"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": "127.0.0.1:9"}],
        routes=[{"match": {"listener": "fwd", "port": 9}, "upstream": f"127.0.0.1:{http_origin}", "name": "redir"}],
    )
    out = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/x"], capture_output=True, check=True).stdout
    assert out == f"hello from {http_origin} /x\n".encode()
    (record,) = gate.wait_records(1)
    assert (record["rule"], record["action"], record["upstream"]) == ("redir", "upstream", f"127.0.0.1:{http_origin}")


@pytest.mark.parametrize("routes", [[{"action": "reject"}], [{"action": "direct"}]], ids=["reject", "refused"])
def test_failure_resets_the_client(start_gate: Any, routes: list[dict[str, Any]]) -> None:
    port, closed = free_port(), free_port()
    gate = start_gate([{"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{closed}"}],
                      routes=routes)
    # (on a busy machine the reset may come before connect() returns, which then raises it)
    with pytest.raises(ConnectionResetError), socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(10)
    (record,) = gate.wait_records(1)
    assert record["close"] == ("rejected" if routes[0]["action"] == "reject" else "upstream error"), record


def test_ipv6_listener_and_upstream(start_gate: Any, hash_echo: int) -> None:
    v6_server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    port = free_port("::1")
    start_gate([{"name": "f6", "kind": "forward", "listen": f"[::1]:{port}",
                 "to": f"[::1]:{v6_server.getsockname()[1]}"}])
    with socket.create_connection(("::1", port), timeout=5) as c:
        conn, _ = v6_server.accept()
        c.sendall(b"over v6")
        assert conn.recv(100) == b"over v6"
        conn.sendall(b"back")
        assert c.recv(100) == b"back"
        conn.close()
    v6_server.close()
