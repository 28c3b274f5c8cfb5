"""WebRTC between gates across a NAT: gate C sits in the client namespace behind the gateway's
MASQUERADE (no inbound path) and keeps a reverse tunnel to gate B (server namespace); B's flows ``via``
C go over a WebRTC data channel whose offer travels over that tunnel and whose ICE checks cross the NAT
(C's checks open the mapping, B answers its peer-reflexive address). With UDP dropped in the NAT the
flows fall back to HTTP/2 over the tunnel within the ICE timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.e2e.test_capture import spawn, wait_listening
from tests.e2e.test_mesh import keygen

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

ECHO_PORT = 8090
ECHO = """
import socket, sys, threading
listener = socket.create_server(("0.0.0.0", int(sys.argv[1])))
def echo(conn):
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""
# SOCKS5 CONNECT through 127.0.0.1:1080 to argv[1]:argv[2], send argv[3] random bytes while reading the
# echo, half-close; prints "OK <bytes>" when every byte came back in order
CLIENT = """
import os, socket, sys, threading
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", 1080), timeout=60)
s.sendall(b"\\x05\\x01\\x00"); assert s.recv(2) == b"\\x05\\x00"
s.sendall(b"\\x05\\x01\\x00\\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
reply = s.recv(10); assert reply[1] == 0, reply
blob = os.urandom(size)
def send():
    s.sendall(blob)
    s.shutdown(socket.SHUT_WR)
sender = threading.Thread(target=send)
sender.start()
got = bytearray()
while chunk := s.recv(1 << 16):
    got += chunk
sender.join()
print("OK" if got == blob else "DIFFERENT", len(got))
"""
NAT = """
table ip ugwr_nat {
  chain post {
    type nat hook postrouting priority 100
    oifname "wan0" masquerade
  }
}
table inet ugwr_fw {
  chain forward_in {
    type filter hook forward priority 0; policy drop
    ct state established,related accept
    iifname "lan0" accept
  }
}
"""
NO_UDP = """
table inet ugwr_no_udp {
  chain forward_udp {
    type filter hook forward priority -10; policy accept
    meta l4proto udp drop
  }
}
"""


@pytest.fixture
def nat() -> Iterator[netns.Topology]:
    prefix = f"ugwr{os.getpid() % 100000}"
    netns.remove(prefix)
    topo = netns.router(prefix)
    echo = None
    try:
        topo.run("gateway", "nft", "-f", "-", input_text=NAT)
        echo = spawn(topo, "client", sys.executable, "-c", ECHO, str(ECHO_PORT))
        wait_listening(topo, "client", ECHO_PORT)
        yield topo
    finally:
        if echo is not None:
            echo.terminate()
            echo.wait()
        topo.remove()


def _gates(start_gate: Any, tmp_path: Path, topo: netns.Topology) -> tuple[Any, Any]:
    a = topo.addr
    keygen(tmp_path / "c")
    id_b = keygen(tmp_path / "b")
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"{a['server4']}:15008"},
         {"name": "socks", "kind": "socks5", "listen": "127.0.0.1:1080"}],
        routes=[{"match": {"dst": [f"{a['client4']}/32"]}, "via": "c"}, {"action": "reject"}],
        netns=topo.ns["server"], mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "c", "cert": str(tmp_path / "c" / "cert.pem"), "transports": ["webrtc", "h2"]}],
    )
    c = start_gate([], netns=topo.ns["client"], mesh={"identity": str(tmp_path / "c")},
                   peers=[{"name": "b", "address": f"{a['server4']}:15008", "id": id_b, "reverse": True,
                           "transports": ["webrtc", "h2"],
                           "allow": [{"dst": [f"{a['client4']}/32"], "port": [ECHO_PORT]}]}])
    deadline = time.monotonic() + 10
    while "reverse tunnel from gate c" not in b.stderr():
        assert time.monotonic() < deadline, b.stderr()[-2000:]
        time.sleep(0.05)
    return b, c


def _echo_through_b(topo: netns.Topology, size: int) -> str:
    return subprocess.run(topo.cmd("server", sys.executable, "-c", CLIENT, topo.addr["client4"], str(ECHO_PORT),
                                   str(size)), capture_output=True, text=True, timeout=120).stdout.strip()


def test_flows_cross_the_nat_over_webrtc_byte_exact(start_gate: Any, tmp_path: Path, nat: netns.Topology) -> None:
    b, c = _gates(start_gate, tmp_path, nat)
    size = 20 << 20
    assert _echo_through_b(nat, size) == f"OK {size}", b.stderr()[-3000:]
    records = c.wait_records(1)
    assert [(r["listener"], r["path"], r["bytes_up"], r["bytes_down"]) for r in records] == [
        ("b", "webrtc", size, size)], records
    assert "webrtc: connected to c" in b.stderr() and "falls back" not in b.stderr()


def test_udp_blocked_in_the_nat_falls_back_to_h2(start_gate: Any, tmp_path: Path, nat: netns.Topology) -> None:
    nat.run("gateway", "nft", "-f", "-", input_text=NO_UDP)
    b, c = _gates(start_gate, tmp_path, nat)
    started = time.monotonic()
    assert _echo_through_b(nat, 1 << 20) == f"OK {1 << 20}"
    assert time.monotonic() - started < 5  # the ICE timeout (2.5 s: half the connect timeout) and the flow
    assert [(r["listener"], r["path"]) for r in c.wait_records(1)] == [("b", "h2")]
    assert "falls back to h2" in b.stderr()
