"""The admin listener's spec: never open over TCP without a token, unix sockets by permissions, and
``ugate check`` reading the token as ``run`` does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gate.addr import Endpoint
from gate.config import AdminSpec, parse_config
from gate.control_specs import AdminAuth
from gate.errors import ConfigError
from tests.conftest import ROOT


def _config(**admin: Any) -> dict[str, Any]:
    return {"listeners": [{"name": "adm", "kind": "admin", **admin}]}


def problems(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return e.value.problems


def test_tcp_admin_needs_a_token_unless_auth_none_on_loopback() -> None:
    assert problems(_config(listen="127.0.0.1:9090")) == [
        "listeners[0].auth: a TCP admin listener needs token_file or token_env (or auth: none, on loopback only)"]
    assert problems(_config(listen="0.0.0.0:9090", auth="none")) == [
        "listeners[0].auth: none is only allowed on a loopback address or a unix socket, not 0.0.0.0"]
    assert problems(_config(listen="10.1.2.3:9090", auth="none")) != []
    for host in ("127.0.0.1", "[::1]", "localhost"):
        (spec,) = parse_config(_config(listen=f"{host}:9090", auth="none")).listeners
        assert isinstance(spec, AdminSpec) and spec.auth == AdminAuth.NONE and spec.unix_path is None
    (spec,) = parse_config(_config(listen="0.0.0.0:9090", token_env="UGATE_TOKEN")).listeners
    assert isinstance(spec, AdminSpec) and spec.auth == AdminAuth.TOKEN and spec.token_env == "UGATE_TOKEN"
    assert problems(_config(listen="127.0.0.1:9090", token_env="A", token_file="/b")) == [
        "listeners[0].token_env: give token_file or token_env, not both"]


def test_unix_socket_path_relies_on_permissions() -> None:
    (spec,) = parse_config(_config(listen="/run/ugate/admin.sock")).listeners
    assert isinstance(spec, AdminSpec)
    assert spec.unix_path == "/run/ugate/admin.sock" and spec.auth == AdminAuth.NONE
    assert spec.listen == Endpoint("/run/ugate/admin.sock", 0)
    (spec,) = parse_config(_config(listen="/run/a.sock", token_file="/etc/t")).listeners
    assert spec.auth == AdminAuth.TOKEN
    assert problems(_config(listen="/" + "x" * 120))[0].startswith("listeners[0].listen: ")
    assert problems(_config(listen="relative.sock"))[0].startswith("listeners[0].listen: ")
    # a unix path is not a host:port anywhere else
    assert problems({"listeners": [{"name": "s", "kind": "socks5", "listen": "/run/s.sock"}]})[0].startswith(
        "listeners[0].listen: ")


def _check(tmp_path: Path, **admin: Any) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump({"listeners": [{"name": "adm", "kind": "admin", "listen": "127.0.0.1:9999",
                                                   **admin}]}))
    return subprocess.run([sys.executable, "-m", "gate", "-c", str(path), "check"], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "UGATE_T": "short"})


def test_check_reads_the_token_as_run_does(tmp_path: Path) -> None:
    assert "needs token_file or token_env" in _check(tmp_path).stderr
    missing = _check(tmp_path, token_file=str(tmp_path / "nope"))
    assert missing.returncode == 2 and "token_file" in missing.stderr and "No such file" in missing.stderr
    (tmp_path / "short").write_text("abc\n")
    assert "at least 16 characters" in _check(tmp_path, token_file=str(tmp_path / "short")).stderr
    assert "at least 16 characters" in _check(tmp_path, token_env="UGATE_T").stderr
    assert "is not set" in _check(tmp_path, token_env="UGATE_NOT_SET").stderr
    (tmp_path / "good").write_text("0123456789abcdef0123\n")
    ok = _check(tmp_path, token_file=str(tmp_path / "good"))
    assert ok.returncode == 0, ok.stderr


def test_default_config_has_no_admin_listener() -> None:
    from gate.config import load_config

    assert not any(isinstance(s, AdminSpec) for s in load_config(ROOT / "configs" / "gate.yaml").listeners)


def test_capture_rules_gauge_counts_what_apply_installs() -> None:
    from gate.admin.server import capture_rules
    from gate.capture import rules_of
    from gate.config import load_config

    config = load_config(ROOT / "configs" / "home-router.yaml")
    found = capture_rules(config)
    assert found is not None and found[0] == "nftables"
    rules = rules_of(config)
    assert rules is not None
    nft = rules[1].nft
    # one per rule statement: a TPROXY line per family and protocol at least, plus the policy routing
    assert found[1] >= nft.count("tproxy") + len(rules[1].ip_rules) + len(rules[1].routes)
    assert found[1] < len(nft.splitlines()) + len(rules[1].ip_rules) + len(rules[1].routes)
    from dataclasses import replace

    assert config.capture is not None
    assert capture_rules(replace(config, capture=replace(config.capture, apply="manual"))) is None  # gate holds none
