"""Routes that send the PROXY protocol header tell the upstream who the client is, on every path."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sniff.proxy_protocol import ProxyHeader, build_v2, parse_proxy_header
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
def test_forward_socks_connect_and_http_send_the_header(start_gate: Any, header_recorder: tuple[int, list[bytes]],
                                                   version: str) -> None:
    port, seen = header_recorder
    fwd, socks, http = free_port(), free_port(), free_port()
    start_gate([{"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{fwd}", "to": f"127.0.0.1:{port}"},
                {"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"},
                {"name": "http", "kind": "http", "listen": f"127.0.0.1:{http}"}],
               routes=[{"action": "direct", "proxy_protocol": version}])
    for args in ([f"http://127.0.0.1:{fwd}/"], ["--socks5", f"127.0.0.1:{socks}", f"http://127.0.0.1:{port}/"],
                 ["-p", "-x", f"http://127.0.0.1:{http}", f"http://127.0.0.1:{port}/"],
                 ["-x", f"http://127.0.0.1:{http}", f"http://127.0.0.1:{port}/"]):  # plain forwarding too
        got = curl("-v", *args)
        assert got.stdout == b"ok\n", got.stderr
    assert len(seen) == 4
    for raw in seen:
        header = parse_proxy_header(raw)
        assert isinstance(header, ProxyHeader)
        assert header.source is not None and header.source[0] == "127.0.0.1"
        assert header.destination == ("127.0.0.1", port)
        assert raw.startswith(b"PROXY TCP4 ") == (version == "v1")


def test_listeners_accept_the_header_from_load_balancers_only(start_gate: Any, http_origin: int,
                                                              hash_echo: int) -> None:
    fwd, socks = free_port(), free_port()
    gate = start_gate(
        [{"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{fwd}", "to": f"127.0.0.1:{hash_echo}",
          "proxy_protocol_from": ["127.0.0.0/8"]},
         {"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}", "proxy_protocol_from": ["127.0.0.1"]}],
        routes=[{"match": {"src": "203.0.113.0/24"}, "action": "direct", "name": "from-lb-client"},
                {"action": "reject", "name": "others"}],
    )
    # through the "load balancer": the header names 203.0.113.7, routes and logs see that client
    with socket.create_connection(("127.0.0.1", fwd), timeout=5) as s:
        s.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\npayload")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(200).endswith(b" 7")  # only "payload" reached the server
    with socket.create_connection(("127.0.0.1", socks), timeout=5) as s:  # header, then SOCKS, in one write
        s.sendall(build_v2(("203.0.113.9", 5555), ("10.0.0.1", 1080)) + b"\x05\x01\x00"
                  + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + http_origin.to_bytes(2, "big"))
        assert s.recv(2) == b"\x05\x00" and s.recv(10)[:2] == b"\x05\x00"  # routed as 203.0.113.9: allowed
    with socket.create_connection(("127.0.0.1", fwd), timeout=5) as s:  # a trusted peer without a header
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    records = gate.wait_records(3)
    assert len(records) == 3, records
    by_listener = {r["listener"] + ":" + (r["rule"] or "-"): r for r in records}
    assert by_listener["fwd:from-lb-client"]["client"] == "203.0.113.7:40000"
    assert by_listener["socks:from-lb-client"]["client"] == "203.0.113.9:5555"
    assert by_listener["fwd:-"]["close"] == "client error"
    assert by_listener["fwd:-"]["detail"].startswith("bad PROXY protocol header")


def test_a_loop_through_proxy_protocol_hops_ends(start_gate: Any) -> None:
    """Two gates that forward to each other with PROXY v2, each trusting the other's header (a loop no
    address check can see: every hop is another gate): the hop count in the header ends it after
    MAX_HOPS gates instead of running until descriptors run out."""
    port_a, port_b = free_port(), free_port()
    each = {"proxy_protocol_from": ["127.0.0.0/8"]}
    routes = [{"action": "direct", "proxy_protocol": "v2", "name": "onward"}]
    a = start_gate([{"name": "a", "kind": "forward", "listen": f"127.0.0.1:{port_a}",
                     "to": f"127.0.0.1:{port_b}", **each}], routes=routes)
    b = start_gate([{"name": "b", "kind": "forward", "listen": f"127.0.0.1:{port_b}",
                     "to": f"127.0.0.1:{port_a}", **each}], routes=routes)
    with socket.create_connection(("127.0.0.1", port_a), timeout=10) as s:
        s.sendall(build_v2(("203.0.113.7", 40000), ("127.0.0.1", port_a)) + b"hello")
        s.settimeout(10)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    deadline = time.monotonic() + 5
    while len(records := a.records() + b.records()) < 9 and time.monotonic() < deadline:
        time.sleep(0.05)  # the hops end one after another, on both gates
    refused = [r for r in records if r["close"] == "refused"]
    assert len(refused) == 1 and "crossed 8 gates" in refused[0]["detail"], records
    assert len(records) == 9, records  # 8 hops relayed, the 9th refused: then every hop ends
