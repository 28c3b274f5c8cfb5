"""Sniffing in the flow: routes on TLS SNI/ALPN and HTTP Host pick upstreams, and a server-first
protocol waits no longer than the bounded sniff wait."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import curl, free_port, wait_port


def test_sni_routes_to_different_upstreams(start_gate: Any, two_https: tuple[int, int]) -> None:
    one, two = two_https
    port = free_port()
    gate = start_gate(
        [{"name": "tls", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{one}", "sniff": True}],
        routes=[{"match": {"sni": "*.blocked.test"}, "action": "reject", "name": "blocked"},
                {"match": {"sni": "two.test", "alpn": "h2"}, "upstream": f"127.0.0.1:{two}", "name": "to-two"},
                {"match": {"protocol": "tls"}, "action": "direct", "name": "tls"}],
    )

    def fetch(name: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
        return curl("-k", "--resolve", f"{name}:{port}:127.0.0.1", *extra, f"https://{name}:{port}/who.txt")

    assert fetch("one.test").stdout == b"one\n"
    assert fetch("two.test").stdout == b"two\n"  # curl offers h2 and http/1.1
    assert fetch("two.test", "--http1.1").stdout == b"one\n"  # no h2 offered: the alpn condition fails
    assert fetch("www.blocked.test").returncode != 0
    records = gate.wait_records(4)
    assert gate.stop() == 0
    assert "sniff outcomes: tls=4" in gate.stderr()
    assert [(r["sni"], r["rule"], r["protocol"]) for r in records] == [
        ("one.test", "tls", "tls"), ("two.test", "to-two", "tls"), ("two.test", "tls", "tls"),
        ("www.blocked.test", "blocked", "tls")]
    assert records[1]["alpn"] == ["h2", "http/1.1"] and records[1]["host"] == "two.test"


def test_http_host_is_sniffed(start_gate: Any, http_origin: int, http_origin2: int) -> None:
    port = free_port()
    gate = start_gate(
        [{"name": "web", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{http_origin}",
          "sniff": True}],
        routes=[{"match": {"host": "*.two.test"}, "upstream": f"127.0.0.1:{http_origin2}"}, {"action": "direct"}],
    )
    got = curl("-H", "Host: www.two.test", f"http://127.0.0.1:{port}/x")
    assert got.stdout == f"hello from {http_origin2} /x\n".encode()
    (record,) = gate.wait_records(1)
    assert (record["protocol"], record["host"]) == ("http", "www.two.test")


@pytest.fixture
def server_first() -> Iterator[int]:
    """An SMTP-like server: greets first, then echoes one line."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"220 ready\r\n")
                conn.sendall(conn.recv(100))

    threading.Thread(target=serve, daemon=True).start()
    yield int(listener.getsockname()[1])
    listener.close()


def test_server_first_protocol_waits_only_the_sniff_bound(start_gate: Any, server_first: int) -> None:
    port = free_port()
    gate = start_gate([{"name": "smtp", "kind": "forward", "listen": f"127.0.0.1:{port}",
                        "to": f"127.0.0.1:{server_first}", "sniff": True, "timeouts": {"sniff": 0.3}}])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        started = time.monotonic()
        assert s.recv(100) == b"220 ready\r\n"
        waited = time.monotonic() - started
        s.sendall(b"HELO x\r\n")
        assert s.recv(100) == b"HELO x\r\n"
    assert 0.25 < waited < 0.8, waited  # the sniff wait (plus its sweep granularity), never more
    (record,) = gate.wait_records(1)
    assert record["protocol"] == "none"
    assert gate.stop() == 0
    assert "sniff outcomes: timeout=1" in gate.stderr()


def test_skip_ports_are_not_sniffed(start_gate: Any, server_first: int) -> None:
    port = free_port()
    start_gate([{"name": "smtp", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{server_first}",
                 "sniff": True, "sniff_skip_ports": [server_first], "timeouts": {"sniff": 2}}])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        started = time.monotonic()
        assert s.recv(100) == b"220 ready\r\n"
        assert time.monotonic() - started < 0.5


def test_sni_listener_routes_by_name_without_terminating(start_gate: Any, two_https: tuple[int, int],
                                                          http_origin: int) -> None:
    one, two = two_https
    port = free_port()
    gate = start_gate(
        [{"name": "ingress", "kind": "sni", "listen": f"127.0.0.1:{port}", "port": one}],
        routes=[{"match": {"sni": "two.test"}, "upstream": f"127.0.0.1:{two}", "name": "two"},
                {"match": {"sni": "*.internal.test"}, "action": "reject", "name": "internal"},
                {"action": "direct", "name": "by-name"}],
    )

    def fetch(name: str) -> subprocess.CompletedProcess[bytes]:
        return curl("-k", "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/who.txt")

    assert fetch("two.test").stdout == b"two\n"
    assert fetch("localhost").stdout == b"one\n"  # no route: SNI:port, i.e. localhost:<one>
    assert fetch("db.internal.test").returncode != 0
    assert curl(f"http://127.0.0.1:{port}/").returncode != 0  # not TLS and no default: closed
    records = gate.wait_records(4)
    assert [(r["rule"], r["dst"]) for r in records[:3]] == [
        ("two", f"two.test:{one}"), ("by-name", f"localhost:{one}"), ("internal", f"db.internal.test:{one}")]
    assert (records[3]["close"], records[3]["detail"]) == ("refused", "no TLS server name (and no default)")


def test_resolve_dials_the_sniffed_name_instead_of_the_address(start_gate: Any, tls_files: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """The same port on two loopback addresses: flows sent to 127.0.0.2 stay there unless a resolve
    route dials their SNI (localhost, i.e. 127.0.0.1) instead."""
    port, servers = free_port(), []
    for name, address in (("one", "127.0.0.1"), ("two", "127.0.0.2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "who.txt").write_text(f"{name}\n")
        servers.append(subprocess.Popen(
            ["openssl", "s_server", "-quiet", "-WWW", "-accept", f"{address}:{port}", "-cert", str(tls_files["cert"]),
             "-key", str(tls_files["key"])], cwd=tmp_path / name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for address in ("127.0.0.1", "127.0.0.2"):
            wait_port(address, port)
        listen = free_port()
        gate = start_gate(
            [{"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{listen}", "to": f"127.0.0.2:{port}",
              "sniff": True}],
            routes=[{"match": {"sni": "localhost"}, "action": "resolve", "name": "by-name"},
                    {"action": "direct", "name": "rest"}])

        def fetch(name: str) -> bytes:
            return curl("-k", "--resolve", f"{name}:{listen}:127.0.0.1", f"https://{name}:{listen}/who.txt").stdout

        assert fetch("localhost") == b"one\n"
        assert fetch("other.test") == b"two\n"  # a name alone never moves a flow
        records = gate.wait_records(2)
        assert [(r["rule"], r["action"], r["upstream"]) for r in records] == [
            ("by-name", "resolve", f"localhost:{port}"), ("rest", "direct", None)]
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()


@pytest.mark.parametrize("proxy", ["socks5h", "http"])
def test_sniffing_inside_proxy_tunnels(start_gate: Any, two_https: tuple[int, int], proxy: str) -> None:
    """A SOCKS5 or CONNECT tunnel's TLS is routed by its SNI when a route asks for it: the client is
    told "connected" first, then its ClientHello picks the upstream; a reject after that is a reset.
    A flow no sniffing route can match keeps the accurate answer (SOCKS reply code, HTTP 403)."""
    one, two = two_https
    port = free_port()
    kind = "socks5" if proxy == "socks5h" else "http"
    gate = start_gate(
        [{"name": "p", "kind": kind, "listen": f"127.0.0.1:{port}", "sniff": True, "timeouts": {"sniff": 2}}],
        routes=[{"match": {"port": [25]}, "action": "reject", "name": "no-mail"},
                {"match": {"sni": "*.blocked.test"}, "action": "reject", "name": "blocked"},
                {"match": {"sni": "two.test"}, "upstream": f"127.0.0.1:{two}", "name": "to-two"},
                {"match": {"protocol": "tls"}, "upstream": f"127.0.0.1:{one}", "name": "tls"},
                {"action": "reject", "name": "rest"}],
    )
    via = ["-x", f"{proxy}://127.0.0.1:{port}", "-k"]
    # names the gate never resolves (socks5h / CONNECT pass them on): the SNI decides where they go
    assert curl(*via, "https://one.test/who.txt").stdout == b"one\n"
    assert curl(*via, "https://two.test/who.txt").stdout == b"two\n"
    blocked = curl(*via, "https://www.blocked.test/who.txt")
    assert blocked.returncode in (35, 56), blocked  # connected, then reset during the TLS handshake
    mail = curl(*via, "-v", "telnet://mail.test:25")
    assert mail.returncode != 0 and (b"403" in mail.stderr if kind == "http" else mail.returncode == 97)
    records = gate.wait_records(4)
    assert gate.stop() == 0
    by_rule = {r["rule"]: r for r in records}
    assert set(by_rule) == {"tls", "to-two", "blocked", "no-mail"}
    assert by_rule["to-two"]["sni"] == "two.test" and by_rule["to-two"]["protocol"] == "tls"
    assert by_rule["tls"]["dst"] == "one.test:443"  # the requested destination is kept in the record
    assert "protocol" not in by_rule["no-mail"] or by_rule["no-mail"]["protocol"] is None  # not sniffed
    assert "sniff outcomes: tls=3" in gate.stderr()
