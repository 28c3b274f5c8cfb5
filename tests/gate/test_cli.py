"""The ugate command: check reports located errors with exit 2; route explains decisions."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gate.cli import _parser, version
from tests.conftest import ROOT, free_port


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


CAPTURE = """
listeners: [{name: t, kind: tproxy, listen: "0.0.0.0:15001"}]
capture: {mode: tproxy, role: egress}
"""


@pytest.mark.parametrize("argv", [
    ["--config", "X", "--log-level", "debug", "check"],
    ["check", "--config", "X", "--log-level", "debug"],
    ["--config", "X", "check", "--log-level", "debug"],
    ["--log-level", "debug", "check", "-c", "X"],
    ["-c", "X", "--log-level", "debug", "route", "--listener", "s", "--dst", "a", "--port", "1"],
    ["--log-level", "debug", "-c", "X", "rules", "show"],
    ["rules", "show", "-c", "X", "--log-level", "debug"],
    ["-c", "X", "--log-level", "debug"],
    ["-c", "X", "--log-level", "debug", "run"],
    ["run", "-c", "X", "--log-level", "debug"],
])
def test_options_mean_the_same_before_and_after_the_command(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert (args.config, args.log_level) == ("X", "debug")


def test_options_default_wherever_they_are_left_out() -> None:
    for argv in ([], ["check"], ["rules", "show"]):
        args = _parser().parse_args(argv)
        assert (args.config, args.log_level) == ("configs/gate.yaml", None)


def test_config_before_the_command_is_the_one_used(tmp_path: Path) -> None:
    bad, capture, ok = tmp_path / "bad.yaml", tmp_path / "capture.yaml", tmp_path / "ok.yaml"
    bad.write_text("listeners: 3\n")
    capture.write_text(CAPTURE)
    ok.write_text(CONFIG)
    done = ugate("--config", str(bad), "check")
    assert done.returncode == 2 and "listeners: expected a non-empty list" in done.stderr
    done = ugate("-c", str(capture), "rules", "show")
    assert done.returncode == 0 and "15001" in done.stdout, done.stderr
    done = ugate("--config", str(ok), "route", "--listener", "fwd", "--dst", "127.0.0.1", "--port", "5201")
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "routes[1] #1: MATCH: upstream -> 127.0.0.1:5202"


def test_version() -> None:
    done = ugate("--version")
    assert done.returncode == 0 and done.stdout == f"ugate {version()}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version())
    with (ROOT / "pyproject.toml").open("rb") as f:  # not installed: the version of this source tree
        assert version("no-such-distribution-ugate") == tomllib.load(f)["project"]["version"]


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return ugate("--config", str(path), "check")


@pytest.mark.parametrize(("first", "second"), [
    ("127.0.0.1:7001", "0.0.0.0:7001"), ("0.0.0.0:7001", "127.0.0.1:7001"), ("[::1]:7001", "[::]:7001"),
    ("[::]:7001", "[fe80::1]:7001"), ("0.0.0.0:7001", "0.0.0.0:7001"),
])
def test_check_refuses_listeners_that_cannot_both_bind(tmp_path: Path, first: str, second: str) -> None:
    done = check(tmp_path, f"""
listeners:
  - {{name: a, kind: socks5, listen: "{first}"}}
  - {{name: b, kind: tproxy, listen: "{second}"}}
""")
    assert done.returncode == 2, done.stdout
    assert re.search(r"^  listeners\[1\]\.listen: .*(overlaps|is used twice)", done.stderr, re.M), done.stderr


@pytest.mark.parametrize(("first", "second"), [
    ("0.0.0.0:7001", "[::]:7001"), ("127.0.0.1:7001", "[::]:7001"), ("127.0.0.1:7001", "127.0.0.2:7001"),
    ("0.0.0.0:7001", "0.0.0.0:7002"),
])
def test_check_accepts_listeners_that_can_both_bind(tmp_path: Path, first: str, second: str) -> None:
    done = check(tmp_path, f"""
listeners:
  - {{name: a, kind: socks5, listen: "{first}"}}
  - {{name: b, kind: tproxy, listen: "{second}"}}
""")
    assert done.returncode == 0, done.stderr


def test_check_accepts_tcp_and_udp_on_the_same_port(tmp_path: Path) -> None:
    done = check(tmp_path, """
listeners:
  - {name: t, kind: tproxy, listen: "0.0.0.0:15001"}
  - {name: u, kind: tproxy_udp, listen: "0.0.0.0:15001"}
  - {name: u6, kind: tproxy_udp, listen: "[::]:15001"}
""")
    assert done.returncode == 0, done.stderr


def make_identity(directory: Path, **kw: Any) -> str:
    from gate.mesh.identity import keygen

    return keygen(directory, **kw).id


def test_check_refuses_peer_ids_that_are_not_gate_ids(tmp_path: Path) -> None:
    good = make_identity(tmp_path / "b")
    for bad in ("REPLACE-WITH-B-ID", good[:-1], good.upper(), good[:-1] + "b", good + "a"):
        done = check(tmp_path, f"""
mesh: {{identity: {tmp_path / "b"}}}
peers: [{{name: b, address: "127.0.0.1:15008", id: {bad}}}]
listeners: [{{name: s, kind: socks5, listen: "127.0.0.1:1080"}}]
routes: [{{via: b}}]
""")
        assert done.returncode == 2 and f"  peers[0].id: {bad!r} is not a gate ID" in done.stderr, (bad, done.stderr)
    done = check(tmp_path, f"""
mesh: {{identity: {tmp_path / "b"}}}
peers: [{{name: b, address: "127.0.0.1:15008", id: {good}}}]
listeners: [{{name: s, kind: socks5, listen: "127.0.0.1:1080"}}]
routes: [{{via: b}}]
""")
    assert done.returncode == 0, done.stderr


def test_check_accepts_via_routes_that_udp_flows_take(tmp_path: Path) -> None:
    """UDP crosses the mesh too (CONNECT-UDP): a via route needs no match.listener to keep UDP out."""
    ident = make_identity(tmp_path / "a")
    config = f"""
mesh: {{identity: {tmp_path / "a"}}}
peers: [{{name: b, address: "127.0.0.1:15008", id: {ident}}}]
listeners:
  - {{name: t, kind: tproxy, listen: "0.0.0.0:15001"}}
  - {{name: u, kind: tproxy_udp, listen: "0.0.0.0:15001"}}
routes:
  - {{match: MATCH, via: b}}
  - {{action: direct}}
"""
    for match in ("{}", "{port: 53}", "{listener: [t, u]}", "{listener: u}"):
        done = check(tmp_path, config.replace("MATCH", match))
        assert done.returncode == 0, (match, done.stdout, done.stderr)


def test_check_builds_the_h2_server_context(tmp_path: Path) -> None:
    """No mesh.ca and no peer cert: no gate could ever be accepted (run died with a traceback)."""
    make_identity(tmp_path / "b")
    other = make_identity(tmp_path / "a")
    text = f"""
mesh: {{identity: {tmp_path / "b"}}}
peers: [{{name: a, address: "127.0.0.1:15009", id: {other}}}]
listeners: [{{name: mesh, kind: h2, listen: "127.0.0.1:{free_port()}"}}]
"""
    done = check(tmp_path, text)
    assert done.returncode == 2, done.stdout
    assert "  listeners[0] (mesh): mesh: an h2 listener needs mesh.ca or peers with cert:" in done.stderr
    done = ugate("--config", str(tmp_path / "c.yaml"))  # run: the same problem, no traceback, exit 2
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot start: listeners[0] (mesh): mesh: an h2 listener needs" in done.stderr
    done = check(tmp_path, text.replace(f"id: {other}", f"cert: {tmp_path / 'a' / 'cert.pem'}"))
    assert done.returncode == 0, done.stderr


def test_check_reads_the_trust_material(tmp_path: Path) -> None:
    make_identity(tmp_path / "ca", is_ca=True)
    make_identity(tmp_path / "me", ca_dir=tmp_path / "ca")
    make_identity(tmp_path / "other")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "key.pem").write_bytes((tmp_path / "other" / "key.pem").read_bytes())
    (tmp_path / "mixed" / "key.pem").chmod(0o600)
    (tmp_path / "mixed" / "cert.pem").write_bytes((tmp_path / "me" / "cert.pem").read_bytes())
    config = """
mesh: {identity: IDENTITY, ca: CA}
listeners: [{name: mesh, kind: h2, listen: "127.0.0.1:15008"}]
"""
    cases = [
        (tmp_path / "me", tmp_path / "ca" / "cert.pem", None),
        (tmp_path / "me", tmp_path / "ca", "  mesh.ca: {ca} is a directory, not a PEM certificate file"),
        (tmp_path / "me", tmp_path / "none.pem", "  mesh.ca: {ca}: No such file or directory"),
        (tmp_path / "me", tmp_path / "ca" / "key.pem", "  mesh.ca: {ca} holds no PEM certificate"),
        (tmp_path / "nowhere", tmp_path / "ca" / "cert.pem", "  mesh.identity: {identity} is not a directory"),
        (tmp_path / "mixed", tmp_path / "ca" / "cert.pem",
         "  mesh.identity: identity in {identity}: cert.pem is not the certificate of key.pem"),
    ]
    for identity, ca, expected in cases:
        done = check(tmp_path, config.replace("IDENTITY", str(identity)).replace("CA", str(ca)))
        if expected is None:
            assert done.returncode == 0, done.stderr
        else:
            assert done.returncode == 2 and expected.format(ca=ca, identity=identity) in done.stderr, done.stderr
