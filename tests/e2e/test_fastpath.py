"""The kernel fast path for captured UDP and the address-only bypass, end to end in the router topology
(namespaces ``ugfp<pid>-*``, always removed): the kernel forwards what the gate handed over, the server
sees the client's address, the gate's sockets see nothing more, and the record comes from the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import netns
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
PREFIX = f"ugfp{os.getpid() % 100000}"
WEB = 8080
UDP_PORT = 9999
PAYLOAD = 200
TIMEOUT = 2.0  # the UDP listeners' session_timeout: the fast path element's timeout

# Echoes each datagram's length and the address it came from (which the client checks), dual-stack.
UDP_SERVER = """
import selectors, socket, sys
selector = selectors.DefaultSelector()
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, int(sys.argv[1])))
    selector.register(sock, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        data, peer = key.fileobj.recvfrom(65535)
        key.fileobj.sendto(("%s %d" % (peer[0], len(data))).encode().ljust(len(data), b"."), peer)
"""

# argv: server, port, count, pause. Sends one datagram, waits for its echo, then count more (one per
# pause), each echoed; prints one JSON line with what the server saw and how many echoes came back.
UDP_CLIENT = """
import json, socket, sys, time
server, port, count, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.connect((server, port))
sock.send(b"x" * 200)
first = sock.recv(65535).decode()
print(json.dumps({"port": sock.getsockname()[1], "seen": first.split()[0]}), flush=True)
sys.stdin.readline()  # the test looks at the gate between the first datagram and the rest
echoes = 0
for _ in range(count):
    sock.send(b"y" * 200)
    try:
        sock.recv(65535)
        echoes += 1
    except socket.timeout:
        pass
    time.sleep(pause)
print(json.dumps({"echoes": echoes}), flush=True)
"""


def spawn(topo: netns.Topology, role: str, *argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(topo.cmd(role, *argv), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(what: str, check: Any, timeout: float = 10.0, detail: Any = str) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{detail()[-3000:]}"
        time.sleep(0.05)
    return got


@pytest.fixture(scope="module")
def router() -> Iterator[netns.Topology]:
    netns.remove(PREFIX)
    topo = netns.router(PREFIX)
    servers = [spawn(topo, "server", sys.executable, "-m", "tests.e2e.peer_server", str(WEB)),
               spawn(topo, "server", sys.executable, "-c", UDP_SERVER, str(UDP_PORT))]
    try:
        wait_for("the servers", lambda: f":{WEB} " in topo.run("server", "ss", "-Hltn")
                 and f":{UDP_PORT} " in topo.run("server", "ss", "-Hlun"))
        yield topo
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()
        topo.remove()


def listeners(mapping: str = "symmetric") -> list[dict[str, Any]]:
    udp = {"kind": "tproxy_udp", "mapping": mapping, "session_timeout": TIMEOUT}
    return [{"name": "tp4", "kind": "tproxy", "listen": "0.0.0.0:15001"},
            {"name": "tp6", "kind": "tproxy", "listen": "[::]:15006"},
            {"name": "udp4", "kind": "tproxy_udp", "listen": "0.0.0.0:15002", **udp},
            {"name": "udp6", "kind": "tproxy_udp", "listen": "[::]:15007", **udp}]


CAPTURE = {"mode": "tproxy", "role": "router", "interfaces": ["lan0"], "apply": "auto"}


def udp_in_datagrams(topo: netns.Topology) -> int:
    """Datagrams the gateway namespace delivered to its own UDP sockets (forwarded ones do not count)."""
    lines = [line.split() for line in topo.run("gateway", "cat", "/proc/net/snmp").splitlines()
             if line.startswith("Udp:")]
    udp4 = int(lines[1][lines[0].index("InDatagrams")])
    six = dict(line.split() for line in topo.run("gateway", "cat", "/proc/net/snmp6").splitlines() if line.strip())
    return udp4 + int(six["Udp6InDatagrams"])


def fastpath_elements(topo: netns.Topology, version: int) -> str:
    return topo.run("gateway", "nft", "list", "set", "inet", "ugate", f"fpc{version}")


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("mapping", ["symmetric", "full-cone"])
def test_udp_session_is_handed_to_the_kernel_and_ends_when_its_element_expires(
        start_gate: Any, router: netns.Topology, version: int, mapping: str) -> None:
    a = router.addr
    server, client = (a["server4"], a["client4"]) if version == 4 else (a["server6"], a["client6"])
    gate = start_gate(listeners(mapping), netns=router.ns["gateway"], capture=CAPTURE, routes=[
        # a listener condition: not compiled to a bypass (that would keep the session from the gate)
        {"match": {"listener": ["udp4", "udp6"], "port": [UDP_PORT]}, "action": "direct", "preserve_source": True,
         "name": "fast"},
        {"action": "direct"}])
    count = 200
    proc = subprocess.Popen(router.cmd("client", sys.executable, "-c", UDP_CLIENT, server, str(UDP_PORT), str(count),
                                       "0.005"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, (proc.stderr.read() if proc.stderr else "") + fastpath_elements(router, version) + str(
            gate.records()) + router.run("gateway", "ss", "-uanp")
        first = json.loads(line)
        assert first["seen"] == client  # the gate relayed the first datagram from the client's address
        element = f"{client} . {first['port']} . {server} . {UDP_PORT}"
        wait_for("the fast path element", lambda: element in fastpath_elements(router, version),
                 detail=gate.stderr)
        before = udp_in_datagrams(router)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        done = json.loads(proc.stdout.readline())
        assert done["echoes"] == count  # every datagram and every answer went through, in the kernel
        delivered = udp_in_datagrams(router) - before
        assert delivered < count // 20, f"the gate's sockets still got {delivered} of {2 * count} datagrams"
        listed = fastpath_elements(router, version)
        assert f"{element} counter packets {count} " in listed, listed
        assert gate.records() == []  # the session lives on in the kernel
    finally:
        proc.kill()
        proc.wait()
    # the client went quiet: the element expires after TIMEOUT, and the session ends with it
    records = gate.wait_records(1, timeout=TIMEOUT * 3 + 3)
    assert len(records) == 1, records
    record = records[0]
    assert record["close"] == "idle timeout" and record["path"] == "kernel" and record["rule"] == "fast"
    assert record["bytes_up"] == (count + 1) * PAYLOAD and record["bytes_down"] == (count + 1) * PAYLOAD, record
    # the first answer may have come back through the kernel already (the session was offloaded when
    # its first datagram went up) or through the gate
    assert record["detail"] in [f"kernel fast path: {count} packets up, {down} down forwarded by the kernel"
                                for down in (count, count + 1)], record
    assert element not in fastpath_elements(router, version)  # the count elements went with it
    assert gate.stop() == 0


@pytest.mark.parametrize("mapping", ["symmetric", "full-cone"])
def test_offload_off_keeps_the_session_in_user_space(start_gate: Any, router: netns.Topology, mapping: str) -> None:
    """Source preservation for UDP in user space: the server answers the client's own address, and the
    capture rules hand that answer to the gate's upstream socket (unconnected with full-cone)."""
    a = router.addr
    gate = start_gate(listeners(mapping), netns=router.ns["gateway"], capture=CAPTURE, routes=[
        {"match": {"port": [UDP_PORT]}, "action": "direct", "preserve_source": True, "offload": "off"},
        {"action": "direct", "preserve_source": True, "match": {"port": [1]}}])  # the sets exist
    proc = subprocess.Popen(router.cmd("client", sys.executable, "-c", UDP_CLIENT, a["server4"], str(UDP_PORT), "50",
                                       "0.002"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert json.loads(proc.stdout.readline())["seen"] == a["client4"]
        before = udp_in_datagrams(router)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["echoes"] == 50
        assert udp_in_datagrams(router) - before >= 100  # both ways through the gate's sockets
    finally:
        proc.kill()
        proc.wait()
    assert gate.stop() == 0
    (record,) = gate.records()
    assert record["path"] == "udp" and record["bytes_up"] == 51 * PAYLOAD


def curl(topo: netns.Topology, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(topo.cmd("client", "curl", "-sS", "--max-time", "10", url), capture_output=True, text=True)


def test_address_only_route_is_bypassed_in_the_kernel(start_gate: Any, router: netns.Topology) -> None:
    a = router.addr
    routes = [{"match": {"dst": [f"{a['server4']}/32"], "port": [WEB]}, "action": "direct", "preserve_source": True,
               "name": "bypass-web4"},
              {"action": "direct"}]
    gate = start_gate(listeners(), netns=router.ns["gateway"], capture=CAPTURE, routes=routes)
    got = curl(router, f"http://{a['server4']}:{WEB}/")
    assert got.stdout == f"you are {a['client4']}\n", got.stderr
    got = curl(router, f"http://[{a['server6']}]:{WEB}/")  # not bypassed: the gate dials it from its own address
    assert got.stdout == f"you are {a['gateway_wan6']}\n", got.stderr
    records = gate.wait_records(1)
    assert gate.stop() == 0
    assert [r["dst"] for r in gate.records()] == [f"[{a['server6']}]:{WEB}"] == [r["dst"] for r in records]


def state(topo: netns.Topology) -> str:
    text = "\n".join(topo.run("gateway", *cmd) for cmd in (
        ["nft", "list", "ruleset"], ["ip", "rule"], ["ip", "-6", "rule"], ["ip", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"]))
    return "\n".join(line for line in text.splitlines() if "table local" not in line and "fe80" not in line)


def test_rules_with_fast_path_and_bypass_clear_exactly(start_gate: Any, router: netns.Topology) -> None:
    before = state(router)
    gate = start_gate(listeners(), netns=router.ns["gateway"], capture=CAPTURE, routes=[
        {"match": {"dst": ["10.99.0.0/16"]}, "action": "direct", "preserve_source": True}, {"action": "direct"}])
    during = state(router)
    assert "set fpc4" in during and "set fp6" in during and "bypass: route #0" in during
    assert gate.stop() == 0
    assert state(router) == before


def test_egress_bypass_leaves_the_apps_own_flows_alone(start_gate: Any) -> None:
    """Egress sidecar: the bypassed destination is reached by the app's own connection (never marked for
    capture), the other one through the gate."""
    prefix = f"{PREFIX}e"
    netns.remove(prefix)
    topo = netns.sidecar(prefix)
    server = spawn(topo, "server", sys.executable, "-m", "tests.e2e.peer_server", str(WEB))
    try:
        wait_for("the web server", lambda: f":{WEB} " in topo.run("server", "ss", "-Hltn"))
        a = topo.addr
        gate = start_gate([{"name": "out4", "kind": "tproxy", "listen": "0.0.0.0:15001"},
                           {"name": "out6", "kind": "tproxy", "listen": "[::]:15006"}], netns=topo.ns["app"],
                          capture={"mode": "tproxy", "role": "egress", "ports": [WEB], "apply": "auto"},
                          routes=[{"match": {"dst": [f"{a['server4']}/32"]}, "action": "direct",
                                   "preserve_source": True, "name": "skip"}, {"action": "direct"}])
        assert 'comment "bypass: route skip"' in topo.run("app", "nft", "list", "table", "inet", "ugate")
        for server_address in (a["server4"], f"[{a['server6']}]"):
            got = subprocess.run(topo.cmd("app", "curl", "-sS", "--max-time", "10",
                                          f"http://{server_address}:{WEB}/"), capture_output=True, text=True)
            assert got.stdout.startswith("you are "), got.stderr
        records = gate.wait_records(1)
        assert gate.stop() == 0
        assert [r["dst"] for r in gate.records()] == [f"[{a['server6']}]:{WEB}"] == [r["dst"] for r in records]
    finally:
        server.terminate()
        server.wait()
        topo.remove()
