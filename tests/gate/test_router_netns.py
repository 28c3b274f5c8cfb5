"""A bypass route whose addresses come from a list file, end to end in the router topology (namespaces
``ugrt<pid>-*``, always removed): the kernel holds them as one named interval set, forwards what it
lists without the gate, and the rules are gone exactly once the gate stops."""

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
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
PREFIX = f"ugrt{os.getpid() % 100000}"
WEB = 8080
LISTED = 3000  # CIDRs besides the server's address: far more than one rule line should hold


@pytest.fixture(scope="module")
def router() -> Iterator[netns.Topology]:
    netns.remove(PREFIX)
    topo = netns.router(PREFIX)
    server = subprocess.Popen(topo.cmd("server", sys.executable, "-m", "tests.e2e.peer_server", str(WEB)), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while f":{WEB} " not in topo.run("server", "ss", "-Hltn"):
            assert time.monotonic() < deadline, "the web server did not start"
            time.sleep(0.05)
        yield topo
    finally:
        server.terminate()
        server.wait()
        topo.remove()


def state(topo: netns.Topology) -> str:
    text = "\n".join(topo.run("gateway", *cmd) for cmd in (
        ["nft", "list", "ruleset"], ["ip", "rule"], ["ip", "-6", "rule"], ["ip", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"]))
    return "\n".join(line for line in text.splitlines() if "table local" not in line and "fe80" not in line)


def curl(topo: netns.Topology, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(topo.cmd("client", "curl", "-sS", "--max-time", "10", url), capture_output=True, text=True)


def test_a_listed_bypass_is_one_interval_set_in_the_kernel(start_gate: Any, router: netns.Topology,
                                                           tmp_path: Path) -> None:
    a = router.addr
    lines = ["# generated: every other /24 of 100.64.0.0/10, and the server"]
    lines += [f"100.{64 + i // 128}.{i % 128 * 2}.0/24" for i in range(LISTED)] + [f"{a['server4']}/32", ""]
    (tmp_path / "country.txt").write_text("\n".join(lines))  # beside the gate's config file
    before = state(router)
    gate = start_gate([{"name": "tp4", "kind": "tproxy", "listen": "0.0.0.0:15001"},
                       {"name": "tp6", "kind": "tproxy", "listen": "[::]:15006"}], netns=router.ns["gateway"],
                      capture={"mode": "tproxy", "role": "router", "interfaces": ["lan0"], "apply": "auto"},
                      routes=[{"name": "country", "match": {"dst_from": "country.txt"}, "action": "direct",
                               "preserve_source": True}, {"action": "direct"}])
    listed = router.run("gateway", "nft", "list", "set", "inet", "ugate", "bypass0_dst4")
    assert "flags interval" in listed and f"{a['server4']}" in listed and "100.64.254.0/24" in listed
    chain = router.run("gateway", "nft", "list", "chain", "inet", "ugate", "prerouting")
    assert chain.count("bypass: route country") == 1 and "ip daddr @bypass0_dst4" in chain
    got = curl(router, f"http://{a['server4']}:{WEB}/")  # listed: the kernel forwards it
    assert got.stdout == f"you are {a['client4']}\n", got.stderr
    got = curl(router, f"http://[{a['server6']}]:{WEB}/")  # not listed (no IPv6 entries): through the gate
    assert got.stdout == f"you are {a['gateway_wan6']}\n", got.stderr
    records = gate.wait_records(1)
    assert gate.stop() == 0
    assert [r["dst"] for r in gate.records()] == [f"[{a['server6']}]:{WEB}"] == [r["dst"] for r in records]
    assert state(router) == before
