"""The WebRTC fast path between two gate processes in namespaces joined by a veth: the SCTP packet size
the gates agree on follows the route's MTU (standard 1,189-byte packets on a 1,500 link, larger ones on
a 9,000 jumbo link), counted on the wire by an nft rule in the receiving namespace, and flows stay
byte-exact both ways on either."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gate.mesh.webrtc.sctp_tuning import PATH_OVERHEAD, STANDARD_PACKET
from tests import netns
from tests.e2e.test_capture import spawn, wait_listening
from tests.e2e.test_mesh import keygen
from tests.e2e.test_webrtc_netns import ECHO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

ECHO_PORT, FWD_PORT, H2_PORT = 8090, 1081, 15008
# Counts UDP datagrams (reassembled, if the sender's kernel fragmented them) by their IP length.
COUNT = """
table inet ugrf_count {
  counter udp_all {}
  counter udp_big {}
  chain count_input {
    type filter hook input priority 0; policy accept
    meta l4proto udp counter name "udp_all"
    meta l4proto udp meta length > 1500 counter name "udp_big"
  }
}
"""
# Through A's forward listener (port argv[2]) to the echo server behind B: argv[1] random bytes sent while
# reading the echo, then a half-close; prints "OK <bytes>" when every byte came back in order.
CLIENT = """
import os, socket, sys, threading
size = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=60)
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


@pytest.fixture
def link() -> Iterator[netns.Topology]:
    prefix = f"ugrf{os.getpid() % 100000}"
    netns.remove(prefix)
    topo = netns.sidecar(prefix)
    echo = None
    try:
        echo = spawn(topo, "server", sys.executable, "-c", ECHO, str(ECHO_PORT))
        wait_listening(topo, "server", ECHO_PORT)
        yield topo
    finally:
        if echo is not None:
            echo.terminate()
            echo.wait()
        topo.remove()


def _counted(topo: netns.Topology) -> dict[str, int]:
    out = topo.run("server", "nft", "list", "table", "inet", "ugrf_count")
    return {name: int(packets) for name, packets in re.findall(r"counter (\w+) \{\s*packets (\d+)", out)}


def _sending_packet(gate: Any) -> int:
    """The packet size the gate's log says it sends with once the peer announced (0: none yet)."""
    found = re.findall(r"receives \d+-byte SCTP packets: sending (\d+)-byte packets", gate.stderr())
    return int(found[-1]) if found else 0


@pytest.mark.parametrize("mtu", [1500, 9000])
def test_packet_size_follows_the_route_mtu_and_flows_stay_exact(start_gate: Any, tmp_path: Path,
                                                                link: netns.Topology, mtu: int) -> None:
    topo, addr = link, link.addr
    for role in ("app", "server"):
        topo.run(role, "ip", "link", "set", "eth0", "mtu", str(mtu))
    topo.run("server", "nft", "-f", "-", input_text=COUNT)
    keygen(tmp_path / "a")
    id_b = keygen(tmp_path / "b")
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"{addr['server4']}:{H2_PORT}"}],
        netns=topo.ns["server"], mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "transports": ["webrtc"],
                "allow": [{"port": [ECHO_PORT]}]}])
    a = start_gate(
        [{"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{FWD_PORT}", "to": f"127.0.0.1:{ECHO_PORT}"}],
        routes=[{"via": "b"}], netns=topo.ns["app"], mesh={"identity": str(tmp_path / "a")},
        peers=[{"name": "b", "address": f"{addr['server4']}:{H2_PORT}", "id": id_b, "transports": ["webrtc"]}])
    size = 8 << 20
    out = subprocess.run(topo.cmd("app", sys.executable, "-c", CLIENT, str(size), str(FWD_PORT)),
                         capture_output=True, text=True, timeout=120).stdout.strip()
    assert out == f"OK {size}", a.stderr()[-3000:]
    assert [(r["action"], r["bytes_up"], r["bytes_down"]) for r in a.wait_records(1)] == [("via", size, size)]
    assert [(r["path"], r["bytes_up"], r["bytes_down"]) for r in b.wait_records(1)] == [("webrtc", size, size)]
    expected = STANDARD_PACKET if mtu <= 1500 else mtu - PATH_OVERHEAD
    deadline = time.monotonic() + 5
    while not (_sending_packet(a) and _sending_packet(b)):
        assert time.monotonic() < deadline, (a.stderr()[-2000:], b.stderr()[-2000:])
        time.sleep(0.05)
    assert (_sending_packet(a), _sending_packet(b)) == (expected, expected)
    counted = _counted(topo)
    assert counted["udp_all"] > size // 9000  # the upload reached B as UDP
    if mtu <= 1500:
        assert counted["udp_big"] == 0  # nothing larger than the link (and nothing the kernel had to fragment)
    else:
        assert counted["udp_big"] > counted["udp_all"] // 4  # the bulk of the upload went in jumbo datagrams
