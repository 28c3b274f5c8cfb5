"""Interop with an independent WebRTC stack: headless Chromium in a client namespace loads a test page
(tests/e2e/browser/peer.html, from a tiny server beside it), POSTs its offer to a gate's
``webrtc_signal`` listener in the gateway namespace, opens a data channel labelled with a web server's
address in the server namespace, sends a GET through it and reports what came back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.e2e.test_capture import spawn, wait_listening

PREFIX = f"ugrw{os.getpid() % 100000}"
PAGE_PORT, SIGNAL_PORT, WEB_PORT = 8000, 8443, 8080
TOKEN = "chromium-page-token-0123456789abcdef"
PAGE_DIR = Path(__file__).parent / "browser"

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (scripts/test DEBS)")


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[netns.Topology]:
    """client (Chromium, the page's server) -- gateway (the gate) -- server (a web server)."""
    netns.remove(PREFIX)
    topo = netns.router(PREFIX)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        site = tmp_path / "site"
        site.mkdir()
        (site / "hello.txt").write_text("hello from the server namespace\n")
        procs.append(spawn(topo, "server", sys.executable, "-m", "http.server", "--bind", topo.addr["server4"],
                           "--directory", str(site), str(WEB_PORT)))
        procs.append(spawn(topo, "client", sys.executable, str(PAGE_DIR / "page_server.py"), topo.addr["client4"],
                           str(PAGE_PORT), str(tmp_path / "result.json")))
        wait_listening(topo, "server", WEB_PORT)
        wait_listening(topo, "client", PAGE_PORT)
        yield topo
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        topo.remove()


def run_page(topo: netns.Topology, tmp_path: Path, token: str) -> dict[str, Any]:
    """Chromium loads the page until it reports (or 60 s pass); the report."""
    a = topo.addr
    query = urllib.parse.urlencode({"gate": f"http://{a['gateway_lan4']}:{SIGNAL_PORT}/offer", "token": token,
                                    "target": f"{a['server4']}:{WEB_PORT}", "path": "/hello.txt"})
    result = tmp_path / "result.json"
    result.unlink(missing_ok=True)
    browser = subprocess.Popen(
        topo.cmd("client", "chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--disable-features=WebRtcHideLocalIpsWithMdns",
                 f"http://{a['client4']}:{PAGE_PORT}/?{query}"),
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "chromium.log").open("wb"), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not result.exists() or not result.read_bytes():
            assert browser.poll() is None, (tmp_path / "chromium.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the page reported nothing in 60 s"
            time.sleep(0.1)
        time.sleep(0.1)  # (the report is one small write; let it finish)
        return dict(json.loads(result.read_text()))
    finally:
        os.killpg(browser.pid, signal.SIGTERM)  # Chromium's own process group (its renderers and helpers)
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()


@pytest.mark.timeout(300)  # two page loads of up to 60 s each on a loaded machine
def test_chromium_fetches_a_page_from_another_namespace_through_the_gate(start_gate: Any, tmp_path: Path,
                                                                         topo: netns.Topology) -> None:
    a = topo.addr
    token = tmp_path / "token"
    token.write_text(TOKEN)
    gate = start_gate([{"name": "browsers", "kind": "webrtc_signal", "listen": f"{a['gateway_lan4']}:{SIGNAL_PORT}",
                        "token_file": str(token), "origins": [f"http://{a['client4']}:{PAGE_PORT}"]}],
                      netns=topo.ns["gateway"])
    report = run_page(topo, tmp_path, "not-the-token")  # an unauthorised page first
    assert report["status"] == 401, report
    report = run_page(topo, tmp_path, TOKEN)
    assert report["status"] == 200, report
    head, _, body = report["body"].partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200") and body == "hello from the server namespace\n", report
    records = gate.wait_records(5)  # two CORS preflights (done), the refusal, the answer, the flow
    flow = next(r for r in records if r.get("dst") == f"{a['server4']}:{WEB_PORT}")
    assert flow["listener"] == "browsers" and flow["close"] == "eof" and flow["client"].startswith(a["client4"])
    signaling = sorted((r["close"], r["detail"] or "") for r in records if r is not flow)
    assert signaling == [("done", ""), ("done", ""), ("done", "answered"),
                         ("rejected", "401 bearer token missing or wrong")], records
    assert gate.alive()
