"""Routes that send the PROXY protocol header tell the upstream who the client is, on every path."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sniff.proxy_protocol import ProxyHeader, parse_proxy_header
from tests.conftest import curl, free_port


@pytest.fixture
def header_recorder() -> Iterator[tuple[int, list[bytes]]]:
    """Reads a PROXY header then one request line, records the header, answers with an HTTP 200."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                header = parse_proxy_header(data)
                assert isinstance(header, ProxyHeader)
                seen.append(data[: header.consumed])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")

    threading.Thread(target=serve, daemon=True).start()
    yield int(listener.getsockname()[1]), seen
    listener.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_forward_socks_and_connect_send_the_header(start_gate: Any, header_recorder: tuple[int, list[bytes]],
                                                   version: str) -> None:
    port, seen = header_recorder
    fwd, socks, http = free_port(), free_port(), free_port()
    start_gate([{"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{fwd}", "to": f"127.0.0.1:{port}"},
                {"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"},
                {"name": "http", "kind": "http", "listen": f"127.0.0.1:{http}"}],
               routes=[{"action": "direct", "proxy_protocol": version}])
    for args in ([f"http://127.0.0.1:{fwd}/"], ["--socks5", f"127.0.0.1:{socks}", f"http://127.0.0.1:{port}/"],
                 ["-p", "-x", f"http://127.0.0.1:{http}", f"http://127.0.0.1:{port}/"]):
        got = curl("-v", *args)
        assert got.stdout == b"ok\n", got.stderr
    assert len(seen) == 3
    for raw in seen:
        header = parse_proxy_header(raw)
        assert isinstance(header, ProxyHeader)
        assert header.source is not None and header.source[0] == "127.0.0.1"
        assert header.destination == ("127.0.0.1", port)
        assert raw.startswith(b"PROXY TCP4 ") == (version == "v1")
