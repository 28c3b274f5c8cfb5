"""HTTP proxy end to end with curl: plain forwarding, keep-alive across origins, CONNECT to openssl
s_server, authentication, and every error status."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PAYLOAD, PAYLOAD_SHA, curl, free_port


@pytest.fixture
def proxy(start_gate: Any) -> Any:
    port = free_port()
    gate = start_gate(
        [{"name": "http", "kind": "http", "listen": f"127.0.0.1:{port}"}],
        routes=[{"match": {"host": "*.blocked.test"}, "action": "reject", "name": "blocked"},
                {"action": "direct"}],
    )
    gate.url = f"http://127.0.0.1:{port}"
    return gate


def test_plain_get_and_post_byte_exact(proxy: Any, http_origin: int, tmp_path: Path) -> None:
    got = curl("-f", "-x", proxy.url, f"http://127.0.0.1:{http_origin}/payload")
    assert got.returncode == 0 and hashlib.sha256(got.stdout).hexdigest() == PAYLOAD_SHA
    upload = tmp_path / "up.bin"
    upload.write_bytes(PAYLOAD)
    posted = curl("-f", "-x", proxy.url, "--data-binary", f"@{upload}", f"http://127.0.0.1:{http_origin}/sha")
    assert posted.stdout.decode() == PAYLOAD_SHA
    records = proxy.wait_records(2)
    assert [r["path"] for r in records] == ["http", "http"]
    assert records[1]["bytes_up"] > len(PAYLOAD) and records[0]["bytes_down"] > len(PAYLOAD)


def test_proxy_headers_are_handled(proxy: Any, http_origin: int) -> None:
    got = curl("-f", "-x", proxy.url, "-H", "Proxy-Connection: keep-alive", "-H", "Connection: X-Secret",
               "-H", "X-Secret: 1", "-H", "X-Kept: yes", f"http://127.0.0.1:{http_origin}/echo-headers")
    seen = json.loads(got.stdout)
    assert "proxy-connection" not in seen and "x-secret" not in seen  # hop-by-hop, and named in Connection
    assert seen["x-kept"] == "yes" and seen["via"] == "1.1 ugate"
    assert seen["host"] == f"127.0.0.1:{http_origin}"


def test_keep_alive_across_origins(proxy: Any, http_origin: int, http_origin2: int) -> None:
    got = curl("-v", "-f", "-x", proxy.url, f"http://127.0.0.1:{http_origin}/a",
               f"http://127.0.0.1:{http_origin2}/b", f"http://127.0.0.1:{http_origin}/c")
    assert got.stdout == (f"hello from {http_origin} /a\nhello from {http_origin2} /b\n"
                          f"hello from {http_origin} /c\n").encode()
    assert got.stderr.count(b"Connected to 127.0.0.1") == 1, got.stderr.decode()  # one proxy connection
    assert len(proxy.wait_records(3)) == 3


def test_connect_to_https_server(proxy: Any, https_origin: int, tls_files: dict[str, Path]) -> None:
    got = curl("-f", "-p", "-x", proxy.url, "--cacert", str(tls_files["cert"]),
               f"https://localhost:{https_origin}/payload.bin")
    assert got.returncode == 0, got.stderr
    assert hashlib.sha256(got.stdout).hexdigest() == PAYLOAD_SHA
    (record,) = proxy.wait_records(1)
    assert record["host"] == "localhost" and record["path"] == "splice" and record["dst"] == f"localhost:{https_origin}"


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("http://www.blocked.test/", 403),
        ("http://127.0.0.1:{closed}/", 502),
        ("http://name.invalid/", 502),
    ],
)
def test_error_statuses(proxy: Any, target: str, status: int) -> None:
    got = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url, target.format(closed=free_port()))
    assert got.stdout.decode() == str(status)


def test_connect_errors(proxy: Any) -> None:
    got = curl("-p", "-x", proxy.url, "-w", "%{http_connect}", "https://www.blocked.test/")
    assert got.stdout.decode().endswith("403")
    got = curl("-p", "-x", proxy.url, "-w", "%{http_connect}", f"https://127.0.0.1:{free_port()}/")
    assert got.stdout.decode().endswith("502")


def test_connect_timeout_is_504(start_gate: Any, black_hole: int) -> None:
    port = free_port()
    start_gate([{"name": "http", "kind": "http", "listen": f"127.0.0.1:{port}", "timeouts": {"connect": 1}}])
    got = curl("-p", "-x", f"http://127.0.0.1:{port}", "-w", "%{http_connect}", f"https://127.0.0.1:{black_hole}/")
    assert got.stdout.decode().endswith("504")


def test_authentication(start_gate: Any, http_origin: int) -> None:
    port = free_port()
    start_gate([{"name": "http", "kind": "http", "listen": f"127.0.0.1:{port}", "users": {"alice": "s3cret"}}])
    url = f"http://127.0.0.1:{http_origin}/x"
    missing = curl("-i", "-x", f"http://127.0.0.1:{port}", url)
    assert missing.stdout.startswith(b"HTTP/1.1 407")
    assert b'proxy-authenticate: Basic realm="ugate"' in missing.stdout.lower().replace(b"basic", b"Basic")
    wrong = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://alice:nope@127.0.0.1:{port}", url)
    assert wrong.stdout == b"407"
    right = curl("-f", "-x", f"http://alice:s3cret@127.0.0.1:{port}", url)
    assert right.stdout == f"hello from {http_origin} /x\n".encode()


def ask(proxy: Any, request_bytes: bytes) -> tuple[bytes, bytes]:
    """Send ``request_bytes`` on a raw connection; the answer's status line and body (read to close)."""
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request_bytes)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n", b"400 Bad Request",
         b'400 request target "/relative" is not an absolute http:// URI\n'),
        (b"GET https://example.test/ HTTP/1.1\r\nHost: example.test\r\n\r\n", b"400 Bad Request",
         b"400 https:// targets need CONNECT (this proxy does not terminate TLS)\n"),
        (b"CONNECT nonsense HTTP/1.1\r\nHost: x\r\n\r\n", b"400 Bad Request",
         b'400 CONNECT target "nonsense" is not host:port\n'),
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400 Bad Request",
         b'400 bad request: illegal request line: "\\x16\\x03\\x01\\x02\\x00garbage"\n'),
        (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70000, b"431 Request Header Fields Too Large",
         b"431 request head larger than 65536 bytes\n"),  # head never ends
        (b"GET http://www.blocked.test/ HTTP/1.1\r\nHost: www.blocked.test\r\n\r\n", b"403 Forbidden",
         b"403 rejected by blocked\n"),
    ],
    ids=["relative", "https-uri", "bad-authority", "tls-bytes", "huge-head", "rejected"],
)
def test_bad_requests(proxy: Any, request_bytes: bytes, status: bytes, body: bytes) -> None:
    assert ask(proxy, request_bytes) == (b"HTTP/1.1 " + status, body)


def test_upstream_error_reads_as_text(proxy: Any) -> None:
    closed = free_port()
    status, body = ask(proxy, f"GET http://127.0.0.1:{closed}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == b"HTTP/1.1 502 Bad Gateway"
    (record,) = proxy.wait_records(1)
    assert body == record["detail"].encode() + b"\n" and b"'" not in body, body  # e.g. "502 connection refused"


def test_authentication_status_line(start_gate: Any, http_origin: int) -> None:
    port = free_port()
    gate = start_gate([{"name": "http", "kind": "http", "listen": f"127.0.0.1:{port}", "users": {"a": "b"}}])
    gate.url = f"http://127.0.0.1:{port}"
    status, body = ask(gate, f"GET http://127.0.0.1:{http_origin}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert (status, body) == (b"HTTP/1.1 407 Proxy Authentication Required", b"407 proxy authentication required\n")
