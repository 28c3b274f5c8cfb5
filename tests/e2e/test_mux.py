"""The mux listener serves SOCKS5, the HTTP proxy, TLS by SNI and SSH on one port."""

from __future__ import annotations

import hashlib
import socket
from typing import Any

from tests.conftest import curl, free_port


def test_one_port_four_protocols(start_gate: Any, http_origin: int, two_https: tuple[int, int],
                                 hash_echo: int) -> None:
    one, _ = two_https
    port = free_port()
    gate = start_gate([{"name": "mux", "kind": "mux", "listen": f"127.0.0.1:{port}", "tls_port": one,
                        "ssh": f"127.0.0.1:{hash_echo}"}])
    url = f"http://127.0.0.1:{http_origin}/m"
    expected = f"hello from {http_origin} /m\n".encode()
    assert curl("--socks5-hostname", f"127.0.0.1:{port}", url).stdout == expected
    assert curl("--socks4a", f"127.0.0.1:{port}", url).stdout == expected
    assert curl("-x", f"http://127.0.0.1:{port}", url).stdout == expected
    tls = curl("-k", "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/who.txt")
    assert tls.stdout == b"one\n"
    banner = b"SSH-2.0-OpenSSH_9.2p1 test\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(banner)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(200).decode() == f"{hashlib.sha256(banner).hexdigest()} {len(banner)}"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # nothing serves this
        s.sendall(b"\x00\x01garbage")
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
    records = sorted(gate.wait_records(6), key=lambda r: r["id"])  # in accept order, not in order of ending
    assert [r["protocol"] for r in records] == ["socks", "socks", "http", "tls", "ssh", "unknown"]
    assert records[3]["dst"] == f"localhost:{one}" and records[4]["dst"] == f"127.0.0.1:{hash_echo}"
    assert (records[5]["close"], records[5]["detail"]) == ("client error", "nothing serves unknown on this port")
