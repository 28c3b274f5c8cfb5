"""SOCKS5/4a end to end with curl (byte-exact payloads) and raw clients (every reply code)."""

from __future__ import annotations

import hashlib
import socket
import struct
from typing import Any

import pytest

from tests.conftest import PAYLOAD, PAYLOAD_SHA, curl, free_port


@pytest.fixture
def socks(start_gate: Any) -> Any:
    port = free_port()
    gate = start_gate(
        [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{port}"}],
        routes=[{"match": {"host": "*.blocked.test"}, "action": "reject", "name": "blocked"},
                {"match": {"dst": "192.0.2.0/24"}, "action": "reject", "name": "test-net"},
                {"action": "direct"}],
        timeouts={"handshake": 2, "connect": 1, "idle": 30, "drain": 1},
    )
    gate.addr = ("127.0.0.1", port)
    return gate


@pytest.mark.parametrize("flag", ["--socks5-hostname", "--socks5", "--socks4a", "--socks4"])
def test_curl_download_byte_exact(socks: Any, http_origin: int, flag: str) -> None:
    host = "localhost" if flag in ("--socks5-hostname", "--socks4a") else "127.0.0.1"
    got = curl("-f", flag, "{}:{}".format(*socks.addr), f"http://{host}:{http_origin}/payload")
    assert got.returncode == 0, got.stderr
    assert hashlib.sha256(got.stdout).hexdigest() == PAYLOAD_SHA
    (record,) = socks.wait_records(1)
    assert record["dst"] == f"{host}:{http_origin}" and record["path"] == "splice"
    assert record["host"] == (host if host == "localhost" else None)
    assert record["bytes_down"] > len(PAYLOAD)


def test_curl_upload_byte_exact(socks: Any, http_origin: int, tmp_path: Any) -> None:
    upload = tmp_path / "up.bin"
    upload.write_bytes(PAYLOAD)
    got = curl("-f", "--socks5-hostname", "{}:{}".format(*socks.addr), "--data-binary", f"@{upload}",
               f"http://localhost:{http_origin}/sha")
    assert got.stdout.decode() == PAYLOAD_SHA


def socks5_connect(gate_addr: tuple[str, int], atyp: int, addr: bytes, port: int) -> tuple[socket.socket, int]:
    """Raw SOCKS5 CONNECT; returns the socket and the reply code."""
    s = socket.create_connection(gate_addr, timeout=5)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00" + bytes([atyp]) + addr + struct.pack("!H", port))
    reply = s.recv(4)
    assert len(reply) == 4 and reply[0] == 5, reply
    rest = {1: 4, 4: 16}[reply[3]] + 2
    s.recv(rest)
    return s, reply[1]


def test_half_closed_upload_over_ipv6_address(socks: Any, hash_echo: int) -> None:
    v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    s, code = socks5_connect(socks.addr, 4, socket.inet_pton(socket.AF_INET6, "::1"), v6.getsockname()[1])
    assert code == 0
    conn, _ = v6.accept()
    s.sendall(b"up")
    s.shutdown(socket.SHUT_WR)
    assert conn.recv(10) == b"up" and conn.recv(10) == b""  # the half-close arrived
    conn.sendall(b"down")
    conn.close()
    assert s.recv(10) == b"down"
    s.close()
    v6.close()


@pytest.mark.parametrize(
    ("atyp", "addr", "port", "code"),
    [
        (3, b"\x10www.blocked.test", 80, 2),  # rule forbids
        (1, socket.inet_aton("192.0.2.1"), 80, 2),  # rule forbids (by dst CIDR)
        (1, socket.inet_aton("127.0.0.1"), None, 5),  # connection refused
        (3, b"\x0cname.invalid", 80, 4),  # host unreachable: the name does not resolve
    ],
    ids=["rule-host", "rule-dst", "refused", "unresolvable"],
)
def test_reply_codes(socks: Any, atyp: int, addr: bytes, port: int | None, code: int) -> None:
    s, got = socks5_connect(socks.addr, atyp, addr, port or free_port())
    assert got == code
    assert s.recv(10) == b""
    s.close()


def test_connect_timeout_is_host_unreachable(socks: Any, black_hole: int) -> None:
    s, got = socks5_connect(socks.addr, 1, socket.inet_aton("127.0.0.1"), black_hole)
    assert got == 4
    s.close()


def test_unsupported_command_and_address_type(socks: Any) -> None:
    for request, code in ((b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", 7), (b"\x05\x01\x00\x09", 8)):
        with socket.create_connection(socks.addr, timeout=5) as s:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(request)
            assert s.recv(2) == bytes([5, code])


def test_socks4_reject_and_refused(socks: Any) -> None:
    for ip, port in (("192.0.2.1", 80), ("127.0.0.1", free_port())):
        with socket.create_connection(socks.addr, timeout=5) as s:
            s.sendall(b"\x04\x01" + struct.pack("!H", port) + socket.inet_aton(ip) + b"me\x00")
            assert s.recv(8)[:2] == b"\x00\x5b"


@pytest.fixture
def socks_auth(start_gate: Any) -> tuple[str, int]:
    port = free_port()
    start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{port}", "users": {"alice": "s3cret"}}])
    return ("127.0.0.1", port)


def test_username_password(socks_auth: tuple[str, int], http_origin: int) -> None:
    proxy = "{}:{}".format(*socks_auth)
    url = f"http://localhost:{http_origin}/x"
    good = curl("-f", "--socks5-hostname", f"alice:s3cret@{proxy}", url)
    assert good.stdout == f"hello from {http_origin} /x\n".encode()
    assert curl("-f", "--socks5-hostname", f"alice:wrong@{proxy}", url).returncode == 97  # curl: proxy handshake error
    assert curl("-f", "--socks5-hostname", proxy, url).returncode == 97
    assert curl("-f", "--socks4a", proxy, url).returncode == 97
    with socket.create_connection(socks_auth, timeout=5) as s:  # no acceptable method
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\xff"
    with socket.create_connection(socks_auth, timeout=5) as s:  # wrong password: status 1, then close
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        s.sendall(b"\x01\x05alice\x05wrong")
        assert s.recv(2) == b"\x01\x01"
        assert s.recv(2) == b""
