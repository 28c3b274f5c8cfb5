"""HTTP proxy failures, each driven with raw sockets or real servers: oversized heads, broken request
bodies and responses, clients and origins that go away, and a reused origin connection found closed.
Each ends in an HTTP answer or a clean close and one access-log record, never a traceback."""

from __future__ import annotations

import hashlib
import http.server
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import curl, free_port

PAD = [f"X-Pad-{i}: {'p' * 1000}\r\n".encode() for i in range(70)]  # a 70 KiB head, in 1 KB lines


@pytest.fixture
def proxy(start_gate: Any) -> Any:
    port = free_port()
    gate = start_gate([{"name": "http", "kind": "http", "listen": f"127.0.0.1:{port}"}],
                      timeouts={"handshake": 5, "connect": 5, "idle": 2, "drain": 1})
    gate.addr = ("127.0.0.1", port)
    gate.url = f"http://127.0.0.1:{port}"
    return gate


def exchange(gate: Any, data: bytes, then: Callable[[socket.socket], None] | None = None) -> bytes:
    """Send ``data`` on a new proxy connection (then ``then(sock)``), return all it answers until close."""
    with socket.create_connection(gate.addr, timeout=10) as s:
        s.sendall(data)
        if then is not None:
            then(s)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """One Content-Length framed response from ``s``: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk
        body += chunk
    return head, body


def no_traceback(gate: Any) -> None:
    text = gate.stderr()
    assert "Traceback" not in text and "bug while serving" not in text, text[-3000:]


def rst(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def scripted_origin() -> Iterator[Callable[[bytes], int]]:
    """``scripted_origin(reply)`` starts a raw TCP origin that reads one request head, writes
    ``reply`` as is, and closes; returns its port."""
    listeners: list[socket.socket] = []

    def start(reply: bytes) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    data = b""
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    try:
                        conn.sendall(reply)
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()


# -- head limits --------------------------------------------------------------------------------------


def test_complete_request_head_over_limit_is_431(proxy: Any, http_origin: int) -> None:
    head = f"GET http://127.0.0.1:{http_origin}/big HTTP/1.1\r\nHost: x\r\n".encode() + b"".join(PAD) + b"\r\n"
    assert 65536 < len(head) < 131072  # whole, and far below one read of the gate (256 KiB)
    answer = exchange(proxy, head)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:200]
    assert answer.endswith(b"\r\n\r\n431 request head larger than 65536 bytes\n")
    (record,) = proxy.wait_records(1)
    assert (record["close"], record["detail"]) == ("client error", "request head larger than 65536 bytes")
    assert record["dst"] is None and record["bytes_up"] == 0  # nothing went to the origin


def test_response_head_over_limit_is_502(proxy: Any, scripted_origin: Callable[[bytes], int]) -> None:
    port = scripted_origin(b"HTTP/1.1 200 OK\r\n" + b"".join(PAD) + b"Content-Length: 2\r\n\r\nhi")
    answer = exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer[:200]
    assert answer.endswith(b"\r\n\r\n502 response head larger than 65536 bytes\n")
    (record,) = proxy.wait_records(1)
    assert (record["close"], record["detail"]) == ("upstream error", "502 response head larger than 65536 bytes")


def test_incomplete_response_head_over_limit_is_502(proxy: Any, scripted_origin: Callable[[bytes], int]) -> None:
    port = scripted_origin(b"HTTP/1.1 200 OK\r\n" + b"".join(PAD) * 3)  # never ends
    answer = exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer[:200]
    assert answer.endswith(b"\r\n\r\n502 response head larger than 65536 bytes\n")


# -- request bodies -----------------------------------------------------------------------------------


def test_bad_chunked_body_is_400_not_a_traceback(proxy: Any, http_origin: int) -> None:
    request = (f"POST http://127.0.0.1:{http_origin}/sha HTTP/1.1\r\nHost: x\r\n"
               "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n").encode()
    before = len(proxy.stderr().encode())
    answer = exchange(proxy, request)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    assert answer.endswith(b'\r\n\r\n400 bad request body: illegal chunk header: "zz\\r\\n"\n'), answer
    (record,) = proxy.wait_records(1)
    assert record["close"] == "client error"
    assert record["detail"] == '400 bad request body: illegal chunk header: "zz\\r\\n"'
    no_traceback(proxy)
    print("log bytes for one bad chunked request:", len(proxy.stderr().encode()) - before)


def test_client_closing_mid_body_is_400_not_a_traceback(proxy: Any, http_origin: int) -> None:
    request = (f"POST http://127.0.0.1:{http_origin}/sha HTTP/1.1\r\nHost: x\r\n"
               "Content-Length: 100\r\n\r\n0123456789").encode()
    answer = exchange(proxy, request, lambda s: s.shutdown(socket.SHUT_WR))
    detail = ("bad request body: peer closed connection without sending complete message body "
              "(received 10 bytes, expected 100)")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    assert answer.endswith(f"\r\n\r\n400 {detail}\n".encode()), answer
    (record,) = proxy.wait_records(1)
    assert (record["close"], record["detail"]) == ("client error", f"400 {detail}")
    no_traceback(proxy)


def test_client_reset_mid_body_of_a_later_request_is_logged(proxy: Any, http_origin: int) -> None:
    with socket.create_connection(proxy.addr, timeout=10) as s:
        s.sendall(f"GET http://127.0.0.1:{http_origin}/first HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, body = read_response(s)
        assert head.startswith(b"HTTP/1.1 200 ") and body == f"hello from {http_origin} /first\n".encode()
        s.sendall(f"POST http://127.0.0.1:{http_origin}/sha HTTP/1.1\r\nHost: x\r\n"
                  "Content-Length: 100000\r\n\r\n0123456789".encode())
        time.sleep(0.2)  # the gate is reading the body now
        rst(s)
    first, second = proxy.wait_records(2)
    assert first["close"] == "done"
    assert (second["close"], second["detail"]) == ("client error",
                                                   "client went away during the request body: Connection reset by peer")
    no_traceback(proxy)


def test_slow_body_is_408(proxy: Any, http_origin: int) -> None:
    request = (f"POST http://127.0.0.1:{http_origin}/sha HTTP/1.1\r\nHost: x\r\n"
               "Content-Length: 100\r\n\r\n0123456789").encode()
    answer = exchange(proxy, request)  # and then nothing: the idle timeout is 2 s
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:200]
    assert answer.endswith(b"\r\n\r\n408 request body not received in time\n")
    (record,) = proxy.wait_records(1)
    assert (record["close"], record["detail"]) == ("handshake timeout", "408 request body not received in time")
    no_traceback(proxy)


# -- responses ----------------------------------------------------------------------------------------


def test_bad_status_line_is_502(proxy: Any, scripted_origin: Callable[[bytes], int]) -> None:
    port = scripted_origin(b"garbage\r\n\r\n")
    answer = exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer[:200]
    assert answer.endswith(b'\r\n\r\n502 bad response: illegal status line: "garbage"\n'), answer
    no_traceback(proxy)


def test_bad_chunk_mid_response_closes_the_client(proxy: Any, scripted_origin: Callable[[bytes], int]) -> None:
    port = scripted_origin(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
    answer = exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n5\r\nhello\r\n"), answer
    (record,) = proxy.wait_records(1)
    assert (record["close"], record["detail"]) == ("upstream reset",
                                                   'upstream broke mid-response: illegal chunk header: "zz\\r\\n"')
    no_traceback(proxy)


def test_origin_closing_mid_response_closes_the_client(proxy: Any, scripted_origin: Callable[[bytes], int]) -> None:
    port = scripted_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    answer = exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n0123456789"), answer
    (record,) = proxy.wait_records(1)
    assert record["close"] == "upstream reset" and record["detail"].startswith("upstream broke mid-response: ")
    no_traceback(proxy)


def test_client_reset_mid_response_of_a_later_request_is_logged(proxy: Any, http_origin: int) -> None:
    with socket.create_connection(proxy.addr, timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET http://127.0.0.1:{http_origin}/first HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        read_response(s)
        s.sendall(f"GET http://127.0.0.1:{http_origin}/payload HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.2)  # the gate waits on a full socket now
        rst(s)
    first, second = proxy.wait_records(2)
    assert first["close"] == "done"
    assert second["close"] == "client error" and second["detail"].startswith("client went away mid-response: ")
    no_traceback(proxy)


# -- reused origin connections ------------------------------------------------------------------------


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers with keep-alive framing, then per ``server.mode``: "idle-close" closes each connection
    after its first answer; "drop-second" reads a connection's second request whole and closes it
    unanswered (the race of an origin's idle timeout with a request in flight)."""

    protocol_version = "HTTP/1.1"
    server: _FlakyServer

    def log_message(self, *args: Any) -> None:
        pass

    def handle(self) -> None:
        self.answered = 0
        with self.server.lock:
            self.server.connections += 1
            self.number = self.server.connections
        super().handle()

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.seen.append((self.number, self.command, self.path, len(body)))
        if self.server.mode == "drop-second" and self.answered == 1:
            self.close_connection = True
            return
        reply = f"{self.command} {self.path} {hashlib.sha256(body).hexdigest()[:12]} on {self.number}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
        self.answered += 1
        if self.server.mode == "idle-close":
            self.close_connection = True

    do_GET = do_POST = do_PUT = _serve


class _FlakyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), _Flaky)
        self.mode = mode
        self.lock = threading.Lock()
        self.connections = 0
        self.seen: list[tuple[int, str, str, int]] = []


@pytest.fixture(params=["idle-close", "drop-second"])
def flaky(request: pytest.FixtureRequest) -> Iterator[_FlakyServer]:
    server = _FlakyServer(request.param)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:12]


def test_idempotent_requests_survive_a_closed_reused_connection(proxy: Any, flaky: _FlakyServer,
                                                               tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{flaky.server_address[1]}"
    (tmp_path / "small").write_bytes(b"small")
    got = curl("-v", "-x", proxy.url, f"{base}/a", f"{base}/b", "--next", "-s", "-x", proxy.url,
               "-H", "Expect:", "-T", str(tmp_path / "small"), f"{base}/c")  # no 100 Continue: no response byte
    assert got.stderr.count(b"Connected to 127.0.0.1") == 1, got.stderr.decode()  # one proxy connection
    lines = got.stdout.decode().splitlines()
    assert [line.rsplit(" on ", 1)[0] for line in lines] == [f"GET /a {digest(b'')}", f"GET /b {digest(b'')}",
                                                            f"PUT /c {digest(b'small')}"], lines
    assert [r["close"] for r in proxy.wait_records(3)] == ["done", "done", "done"]
    if flaky.mode == "drop-second":  # b was sent on the reused connection, dropped, and sent again
        assert [(n, path) for n, _, path, _ in flaky.seen] == [(1, "/a"), (1, "/b"), (2, "/b"), (2, "/c"), (3, "/c")]
    no_traceback(proxy)


def test_post_and_large_bodies_are_not_sent_twice(proxy: Any, flaky: _FlakyServer) -> None:
    base = f"http://127.0.0.1:{flaky.server_address[1]}"
    with socket.create_connection(proxy.addr, timeout=10) as s:
        for method, body in ((b"GET", b""), (b"POST", b"once"), (b"GET", b""), (b"PUT", b"x" * 100_000)):
            s.sendall(b"%s %s/ HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (method, base.encode(),
                                                                                      len(body), body))
            head, reply = read_response(s)
            if flaky.mode == "idle-close":  # the closed connection is seen before use: a new one, no retry
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert reply.decode().startswith(f"{method.decode()} / {digest(body)}")
            elif method == b"GET":
                assert head.startswith(b"HTTP/1.1 200 "), head
            else:
                assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), head
                assert reply == b"502 upstream closed without a response\n"
                break
    sent = [(method, size) for _, method, _, size in flaky.seen]
    if flaky.mode == "idle-close":
        assert sent == [("GET", 0), ("POST", 4), ("GET", 0), ("PUT", 100_000)]
    else:
        assert sent == [("GET", 0), ("POST", 4)]  # the POST went once, and was not answered
    no_traceback(proxy)
