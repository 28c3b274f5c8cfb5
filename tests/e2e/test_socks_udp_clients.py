"""SOCKS5 UDP with independent clients, each run against ugate and against Debian's dante-server (the
reference that shows the test clients really speak UDP ASSOCIATE): PySocks to a UDP echo server, and
Dante's ``socksify`` running ``drill`` against a dnsmasq on loopback. (BIND 9's ``dig`` sends with
sendmmsg(), which socksify does not intercept: its queries would go out unwrapped, so drill.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socks  # PySocks

from tests.conftest import free_port, wait_port


def _echo() -> tuple[socket.socket, tuple[str, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:
                return
            sock.sendto(data, peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock, sock.getsockname()


def _wait_dns(port: int, timeout: float = 5.0) -> None:
    """Until the DNS server on ``port`` answers a query (UDP: nothing to connect to)."""
    query = (Path(__file__).parent.parent / "sniff" / "fixtures" / "dig_query.bin").read_bytes()
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        while time.monotonic() < deadline:
            s.sendto(query, ("127.0.0.1", port))
            try:
                s.recv(2000)
                return
            except OSError:
                continue
    raise AssertionError(f"dnsmasq on port {port} did not answer")


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[int]:
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (Debian dnsmasq-base)")
    port = free_port()
    proc = subprocess.Popen(
        ["dnsmasq", "-k", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "-p", str(port),
         "--listen-address=127.0.0.1", "--bind-interfaces", "--address=/example.test/192.0.2.7",
         f"--pid-file={tmp_path / 'dnsmasq.pid'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_dns(port)
    yield port
    proc.terminate()
    proc.wait(5)


@pytest.fixture(params=["ugate", "danted"])
def server(request: Any, start_gate: Any, tmp_path: Path) -> Iterator[tuple[str, tuple[str, int], Any]]:
    """(name, SOCKS address, ugate's Gate or None): a SOCKS5 server with UDP ASSOCIATE."""
    port = free_port()
    if request.param == "ugate":
        gate = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{port}"}])
        yield "ugate", ("127.0.0.1", port), gate
        return
    if shutil.which("danted") is None:
        pytest.skip("danted is not installed (Debian dante-server)")
    conf = tmp_path / "danted.conf"
    conf.write_text(f"""logoutput: {tmp_path / 'danted.log'}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate udpreply }}
""")
    proc = subprocess.Popen(["danted", "-f", str(conf), "-N", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        yield "danted", ("127.0.0.1", port), None
    finally:
        proc.terminate()
        proc.wait(5)


def test_pysocks_echo(server: tuple[str, tuple[str, int], Any]) -> None:
    _, addr, gate = server
    echo, echo_addr = _echo()
    s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    s.set_proxy(socks.SOCKS5, *addr)
    s.settimeout(3)
    s.bind(("127.0.0.1", 0))
    for size in (1, 1200, 8000):
        data = os.urandom(size)
        s.sendto(data, echo_addr)
        assert s.recvfrom(65535) == (data, echo_addr)
    s.sendto(b"by name", ("localhost", echo_addr[1]))
    assert s.recvfrom(100) == (b"by name", echo_addr)  # both answer from the resolved address
    s.close()
    echo.close()
    if gate is not None:
        # two destinations: the address, and the name (a session per destination as the client names it)
        records = gate.wait_records(3)
        assert sorted(r["host"] or "" for r in records if r["path"] == "udp") == ["", "localhost"]


def test_socksify_drill_against_dnsmasq(server: tuple[str, tuple[str, int], Any], dnsmasq: int,
                                        tmp_path: Path) -> None:
    if shutil.which("socksify") is None or shutil.which("drill") is None:
        pytest.skip("socksify (Debian dante-client) or drill (Debian ldnsutils) is not installed")
    _, addr, gate = server
    conf = tmp_path / "socks.conf"
    conf.write_text(f"""route {{
  from: 0.0.0.0/0 to: 0.0.0.0/0 via: {addr[0]} port = {addr[1]}
  proxyprotocol: socks_v5
  command: udpassociate connect
  method: none
}}
""")
    # without SOCKS_AUTOADD_LANROUTES=no socksify sends loopback traffic direct, proving nothing
    env = {**os.environ, "SOCKS_CONF": str(conf), "SOCKS_AUTOADD_LANROUTES": "no"}
    got = subprocess.run(["socksify", "drill", "-p", str(dnsmasq), "@127.0.0.1", "example.test"],
                         env=env, capture_output=True, text=True, timeout=20)
    assert got.returncode == 0, got.stderr
    assert "192.0.2.7" in got.stdout
    if gate is not None:  # the query went through UDP ASSOCIATE, not around it
        records = gate.wait_records(2)
        (flow,) = [r for r in records if r["path"] == "udp"]
        assert (flow["protocol"], flow["dst"], flow["host"]) == ("dns", f"127.0.0.1:{dnsmasq}", "example.test")
        assert flow["bytes_up"] > 0 and flow["bytes_down"] > 0
        assert [r["path"] for r in records].count("udp-associate") == 1
