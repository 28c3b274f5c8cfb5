"""The ``udp:`` mapping of socks5 and mux listeners: defaults, every key, and each problem located."""

from __future__ import annotations

from typing import Any

import pytest

from gate.config import MuxSpec, Socks5Spec, parse_config
from gate.errors import ConfigError
from gate.specs import SocksUdp


def listener(kind: str, udp: Any = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "s", "kind": kind, "listen": "127.0.0.1:1080"}
    if udp is not None:
        spec["udp"] = udp
    return spec


@pytest.mark.parametrize("kind", ["socks5", "mux"])
def test_defaults(kind: str) -> None:
    (spec,) = parse_config({"listeners": [listener(kind)]}).listeners
    assert isinstance(spec, (Socks5Spec, MuxSpec))
    assert spec.udp == SocksUdp() and spec.udp.enabled


@pytest.mark.parametrize("kind", ["socks5", "mux"])
def test_every_key(kind: str) -> None:
    udp = {"enabled": False, "session_timeout": 5, "max_destinations": 3, "max_associations_per_client": 2,
           "max_sessions": 100, "max_datagram": 1400}
    (spec,) = parse_config({"listeners": [listener(kind, udp)]}).listeners
    assert isinstance(spec, (Socks5Spec, MuxSpec))
    assert spec.udp == SocksUdp(False, 5.0, 3, 2, 100, 1400)


@pytest.mark.parametrize(
    ("udp", "where"),
    [
        ({"max_destinations": 0}, "listeners[0].udp.max_destinations"),
        ({"max_datagram": 70000}, "listeners[0].udp.max_datagram"),
        ({"session_timeout": -1}, "listeners[0].udp.session_timeout"),
        ({"enabled": "sometimes"}, "listeners[0].udp.enabled"),
        ({"frag": True}, "listeners[0].udp.frag"),
        ("yes", "listeners[0].udp"),
    ],
)
def test_problems_are_located(udp: Any, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"listeners": [listener("socks5", udp)]})
    assert any(p.startswith(where + ":") for p in e.value.problems), e.value.problems
