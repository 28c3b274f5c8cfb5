"""The ugate command: check reports located errors with exit 2; route explains decisions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def ugate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)


CONFIG = """
listeners:
  - {name: socks, kind: socks5, listen: "127.0.0.1:1080"}
  - {name: fwd, kind: forward, listen: "127.0.0.1:5201", to: "127.0.0.1:5202"}
routes:
  - match: {host: "*.blocked.test"}
    action: reject
  - match: {listener: fwd, port: 5201}
    upstream: 127.0.0.1:5202
  - action: direct
"""


def test_check_ok(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(CONFIG)
    done = ugate("check", "--config", str(path))
    assert done.returncode == 0 and "ok (2 listeners, 3 routes)" in done.stdout


def test_check_default_config() -> None:
    assert ugate("check", "--config", "configs/gate.yaml").returncode == 0


def test_check_reports_every_located_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(CONFIG.replace('"127.0.0.1:5201"', '"x:99999"').replace("action: reject", "action: deny"))
    done = ugate("check", "--config", str(path))
    assert done.returncode == 2
    assert "listeners[1].listen: 'x:99999' is not host:port" in done.stderr
    assert "routes[0].action: 'deny' is not one of: direct, upstream, resolve, reject" in done.stderr


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listeners: 3\n")
    done = ugate("--config", str(path))
    assert done.returncode == 2 and "listeners: expected a non-empty list" in done.stderr


def test_route_explains(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(CONFIG)
    done = ugate("route", "--config", str(path), "--listener", "socks", "--dst", "www.blocked.test", "--port", "443")
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["routes[0] #0: MATCH: reject"]
    done = ugate("route", "--config", str(path), "--listener", "fwd", "--dst", "127.0.0.1", "--port", "5201")
    assert done.stdout.splitlines() == [
        "routes[0] #0: no: host '(none)' does not match ['*.blocked.test']",
        "routes[1] #1: MATCH: upstream -> 127.0.0.1:5202",
    ]
    done = ugate("route", "--config", str(path), "--listener", "nope", "--dst", "1.2.3.4", "--port", "1")
    assert done.returncode == 2 and "no listener is named 'nope'" in done.stderr


def test_route_explains_sniffed_fields(tmp_path: Path) -> None:
    path = tmp_path / "sni.yaml"
    path.write_text("""
listeners: [{name: t, kind: tproxy, listen: "0.0.0.0:15001"}]
routes:
  - {name: h2-only, match: {sni: "*.example.test", alpn: h2}, upstream: "10.0.0.2:443"}
  - {name: rest, action: direct}
""")
    done = ugate("route", "--config", str(path), "--listener", "t", "--dst", "1.2.3.4", "--port", "443",
                 "--protocol", "tls", "--sni", "www.example.test", "--alpn", "h2,http/1.1")
    assert done.stdout.splitlines() == ["routes[0] h2-only: MATCH: upstream -> 10.0.0.2:443"]
    done = ugate("route", "--config", str(path), "--listener", "t", "--dst", "1.2.3.4", "--port", "443",
                 "--protocol", "tls", "--sni", "www.example.test", "--alpn", "http/1.1")
    assert done.stdout.splitlines()[0] == "routes[0] h2-only: no: alpn ['http/1.1'] has none of ['h2']"
