"""configs/systemd: the units pass ``systemd-analyze verify`` (with no warning) and say what the README
promises: Type=notify, reload by SIGHUP, an unprivileged user with exactly three capabilities."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = ROOT / "configs" / "systemd"
CAPS = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNITS / name)
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (Debian: systemd)")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    ugate = shutil.which("ugate")
    assert ugate is not None, "the ugate command is not installed (pip install -e .)"
    for name in ("ugate.service", "ugate.socket"):  # verify wants the ExecStart binary to exist
        (tmp_path / name).write_text((UNITS / name).read_text().replace("/usr/bin/ugate", ugate))
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "ugate.service"),
                           str(tmp_path / "ugate.socket")], capture_output=True, text=True)
    # verify exits 0 over settings it ignores (a typo): any output is a failure
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def test_service_is_notify_unprivileged_with_three_capabilities() -> None:
    service = _unit("ugate.service")["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["User"] not in ("", "root", "0") and int(service["WatchdogSec"]) > 0
    assert set(service["AmbientCapabilities"].split()) == CAPS
    assert set(service["CapabilityBoundingSet"].split()) == CAPS
    assert service["NoNewPrivileges"] == "yes"


def test_socket_unit_matches_the_default_config() -> None:
    from gate.config import load_config

    listens = {f"{s.listen.host}:{s.listen.port}" for s in load_config(ROOT / "configs" / "gate.yaml").listeners}
    text = (UNITS / "ugate.socket").read_text()
    sockets = {line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ListenStream=")}
    assert sockets == listens
