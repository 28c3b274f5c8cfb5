"""The ingress sidecar end to end (namespaces ``ugin*``, always removed): TPROXY captures inbound
connections to the app's port; with ``preserve_source`` the app sees the real client and its replies come
back through the gate (connmark return routing, tproxy.ingress), over IPv4 and IPv6, with both rule
backends; rules clear exactly; a dead gate follows capture.on_failure."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.conftest import ROOT
from tests.e2e.ingress_app import PAYLOAD
from tests.e2e.test_capture import WEB, curl, pytestmark, spawn, state, wait_listening

__all__ = ["pytestmark"]  # root only, as test_capture's

PREFIX = f"ugin{__import__('os').getpid() % 100000}"
APP = 9090
LISTENERS = [{"name": "in4", "kind": "tproxy", "listen": "0.0.0.0:15001"},
             {"name": "in6", "kind": "tproxy", "listen": "[::]:15006"}]


class App:
    """The app (tests.e2e.ingress_app) in the app namespace; ``peers()`` are the addresses it saw."""

    def __init__(self, topo: netns.Topology, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(topo.cmd("app", sys.executable, "-m", "tests.e2e.ingress_app", str(APP)),
                                     cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.DEVNULL)
        wait_listening(topo, "app", APP)

    def peers(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[netns.Topology, App]]:
    """The sidecar topology with the app (port 9090) and, in the server namespace, the peer server (8080)
    that the app's own outbound traffic goes to."""
    netns.remove(PREFIX)
    topo = netns.sidecar(PREFIX)
    procs: list[subprocess.Popen[bytes]] = []
    app: App | None = None
    try:
        procs.append(spawn(topo, "server", sys.executable, "-m", "tests.e2e.peer_server", str(WEB)))
        wait_listening(topo, "server", WEB)
        app = App(topo, tmp_path / "app.log")
        yield topo, app
    finally:
        if app is not None:
            app.stop()
        for proc in procs:
            proc.terminate()
            proc.wait()
        topo.remove()


def capture(backend: str = "nftables", **extra: Any) -> dict[str, Any]:
    return {"mode": "tproxy", "role": "ingress", "ports": [APP], "apply": "auto", "backend": backend, **extra}


def url(host: str, path: str = "/") -> str:
    return f"http://[{host}]:{APP}{path}" if ":" in host else f"http://{host}:{APP}{path}"


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_app_sees_the_client_and_answers_through_the_gate(start_gate: Any, sidecar: tuple[netns.Topology, App],
                                                          tmp_path: Path, backend: str) -> None:
    topo, app = sidecar
    a = topo.addr
    before = state(topo, "app")
    gate = start_gate([{**spec, "preserve_source": True} for spec in LISTENERS], netns=topo.ns["app"],
                      capture=capture(backend))
    # the rules `ugate rules show` prints include the return routing
    assert ("ingress_return" in topo.run("app", "nft", "list", "ruleset")) == (backend == "nftables")
    if backend == "iptables":
        assert "CONNMARK" in topo.run("app", "iptables-legacy", "-t", "mangle", "-S", "UGATE_OUT")
    for app_addr, client in ((a["app4"], a["server4"]), (a["app6"], a["server6"])):
        got = curl(topo, "server", url(app_addr))
        assert got.returncode == 0, got.stderr + gate.stderr()[-2000:]
        host = got.stdout.split()[2]
        assert host == client, got.stdout  # the real client, not the gate's (= the app's own) address
        # 5 MB byte-exact both ways of the return path (the replies are the bulk)
        out = tmp_path / "payload"
        got = curl(topo, "server", url(app_addr, "/payload"), "-o", str(out))
        assert got.returncode == 0, got.stderr + gate.stderr()[-2000:]
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(PAYLOAD).digest()
    peers = app.peers()
    assert [(p["peer"], p["path"]) for p in peers] == [(a["server4"], "/"), (a["server4"], "/payload"),
                                                       (a["server6"], "/"), (a["server6"], "/payload")]
    records = gate.wait_records(4)
    assert [(r["listener"], r["client"].rsplit(":", 1)[0], r["dst"], r["action"], r["close"]) for r in records] == [
        ("in4", a["server4"], f"{a['app4']}:{APP}", "direct", "eof"),
        ("in4", a["server4"], f"{a['app4']}:{APP}", "direct", "eof"),
        ("in6", f"[{a['server6']}]", f"[{a['app6']}]:{APP}", "direct", "eof"),
        ("in6", f"[{a['server6']}]", f"[{a['app6']}]:{APP}", "direct", "eof")]
    assert records[1]["bytes_down"] > len(PAYLOAD) and records[3]["bytes_down"] > len(PAYLOAD)
    # the app's own traffic elsewhere is not captured and not re-routed: the server sees the app directly
    for server, app_addr in ((a["server4"], a["app4"]), (f"[{a['server6']}]", a["app6"])):
        got = curl(topo, "app", f"http://{server}:{WEB}/")
        assert got.stdout == f"you are {app_addr}\n", got.stderr
    assert len(gate.records()) == 4
    assert gate.stop() == 0
    assert state(topo, "app") == before  # apply: auto cleared everything, the return routing included


def test_without_preserve_source_the_app_sees_the_gate(start_gate: Any, sidecar: tuple[netns.Topology, App]) -> None:
    topo, app = sidecar
    a = topo.addr
    gate = start_gate(LISTENERS, netns=topo.ns["app"], capture=capture())
    assert "ingress_return" not in topo.run("app", "nft", "list", "ruleset")  # the old rule set
    for app_addr in (a["app4"], a["app6"]):
        got = curl(topo, "server", url(app_addr))
        assert got.returncode == 0, got.stderr
        assert got.stdout.split()[2] == app_addr  # the gate dialled from its own address
    assert [p["peer"] for p in app.peers()] == [a["app4"], a["app6"]]
    assert len(gate.wait_records(2)) == 2
    assert gate.stop() == 0


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_dead_gate_closed_drops_until_restart_and_clear_is_exact(start_gate: Any, tmp_path: Path,
                                                                  sidecar: tuple[netns.Topology, App],
                                                                  backend: str) -> None:
    """on_failure closed (the default): after kill -9 the app is unreachable through the port (dropped,
    not served behind the gate's back); ``ugate rules clear`` then restores the namespace exactly."""
    topo, app = sidecar
    a = topo.addr
    before = state(topo, "app")
    gate = start_gate([{**spec, "preserve_source": True} for spec in LISTENERS], netns=topo.ns["app"],
                      capture=capture(backend))
    assert curl(topo, "server", url(a["app4"])).stdout.split()[2] == a["server4"]
    gate.proc.send_signal(signal.SIGKILL)
    gate.proc.wait()
    dropped = curl(topo, "server", url(a["app4"]), "--max-time", "2")
    assert dropped.returncode == 28, dropped  # timed out: dropped
    assert len(app.peers()) == 1
    done = subprocess.run(topo.cmd("app", sys.executable, "-m", "gate", "rules", "clear", "--config",
                                   str(tmp_path / "gate0.yaml")), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert state(topo, "app") == before
    direct = curl(topo, "server", url(a["app4"]))  # no rules: straight to the app
    assert direct.stdout.split()[2] == a["server4"]


def test_dead_gate_open_lets_clients_reach_the_app_directly(start_gate: Any,
                                                            sidecar: tuple[netns.Topology, App]) -> None:
    """on_failure open: the table (return routing included) dies with the gate; the app is then served
    directly, and its replies leave normally (no connection mark is restored any more)."""
    topo, _ = sidecar
    a = topo.addr
    before = state(topo, "app")
    gate = start_gate([{**spec, "preserve_source": True} for spec in LISTENERS], netns=topo.ns["app"],
                      capture=capture(on_failure="open"))
    assert curl(topo, "server", url(a["app6"])).stdout.split()[2] == a["server6"]
    assert len(gate.wait_records(1)) == 1  # written before the kill (the flow may end just after curl)
    gate.proc.send_signal(signal.SIGKILL)
    gate.proc.wait()
    deadline = time.monotonic() + 5
    while "table inet ugate" in topo.run("app", "nft", "list", "ruleset"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for app_addr, client in ((a["app4"], a["server4"]), (a["app6"], a["server6"])):
        direct = curl(topo, "server", url(app_addr), "--max-time", "5")
        assert direct.returncode == 0 and direct.stdout.split()[2] == client, direct
    assert len(gate.records()) == 1  # the gate never saw the direct ones
    gate = start_gate([{**spec, "preserve_source": True} for spec in LISTENERS], netns=topo.ns["app"],
                      capture=capture(on_failure="open"))
    assert curl(topo, "server", url(a["app4"])).stdout.split()[2] == a["server4"]
    assert len(gate.wait_records(1)) == 1
    assert gate.stop() == 0
    assert state(topo, "app") == before


def test_source_port_skips_a_tuple_in_use(start_gate: Any, sidecar: tuple[netns.Topology, App]) -> None:
    """The port the gate dials the app from is not one whose tuple a socket here already has: with two
    ephemeral ports and the client on the one the kernel's bind(0) picks first (odd), only the other
    one works (tproxy.tuples; else the app's SYN lands on the gate's accepted socket)."""
    topo, app = sidecar
    a = topo.addr
    topo.run("app", "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40001")
    gate = start_gate([{**spec, "preserve_source": True} for spec in LISTENERS], netns=topo.ns["app"],
                      capture=capture())
    for app_addr, client in ((a["app4"], a["server4"]), (a["app6"], a["server6"])):
        # bound to its address: a wildcard bind would meet the IPv4 socket's TIME_WAIT on the port
        got = curl(topo, "server", url(app_addr), "--interface", client, "--local-port", "40001")
        assert got.returncode == 0, got.stderr + gate.stderr()[-2000:]
        assert got.stdout.split()[2:] == [client, "40000"]
    assert [p["port"] for p in app.peers()] == [40000, 40000]
    assert [r["client"].rsplit(":", 1)[1] for r in gate.wait_records(2)] == ["40001", "40001"]
    assert gate.stop() == 0



def test_a_route_preserving_the_source(start_gate: Any, sidecar: tuple[netns.Topology, App]) -> None:
    """preserve_source on a route (the listeners keep theirs off), here with a fixed upstream: the return
    routing covers it too, and flows the route does not match keep the gate's address."""
    topo, app = sidecar
    a = topo.addr
    gate = start_gate(LISTENERS, netns=topo.ns["app"], capture=capture(),
                      routes=[{"match": {"listener": "in4"}, "action": "upstream", "upstream": f"{a['app4']}:{APP}",
                               "preserve_source": True},
                              {"action": "direct"}])
    assert "ingress_return" in topo.run("app", "nft", "list", "ruleset")
    got = curl(topo, "server", url(a["app4"]))
    assert got.returncode == 0, got.stderr + gate.stderr()[-2000:]
    assert got.stdout.split()[2] == a["server4"]
    assert curl(topo, "server", url(a["app6"])).stdout.split()[2] == a["app6"]  # the direct route
    assert [r["action"] for r in gate.wait_records(2)] == ["upstream", "direct"]
    assert [p["peer"] for p in app.peers()] == [a["server4"], a["app6"]]
    assert gate.stop() == 0


def test_a_client_reusing_its_port_is_still_captured(start_gate: Any, sidecar: tuple[netns.Topology, App]) -> None:
    """The app closes (Connection: close), so the gate's accepted socket is left in TIME_WAIT; the client
    connects again from the same port at once. Its SYN must reach the gate's listener, not the app's
    through that TIME_WAIT socket (tproxy.ingress.owned_rule; before it, the second connection went to
    the app behind the gate's back and, with on_failure closed, stalled). Without preserve_source: with
    it, the client sometimes closes first and its own TIME_WAIT refuses curl the port (the rule is the
    same; ab against nginx showed both modes fixed)."""
    topo, app = sidecar
    a = topo.addr
    preserve = False
    gate = start_gate(LISTENERS, netns=topo.ns["app"], capture=capture())
    for _ in range(3):
        got = curl(topo, "server", url(a["app4"]), "--interface", a["server4"], "--local-port", "41000",
                   "-H", "Connection: close", "--max-time", "5")
        assert got.returncode == 0, got.stderr
    assert len(gate.wait_records(3)) == 3  # every one through the gate
    assert [p["peer"] for p in app.peers()] == [a["server4"] if preserve else a["app4"]] * 3
    assert gate.stop() == 0
