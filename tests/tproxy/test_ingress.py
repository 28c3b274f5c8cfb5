"""The ingress sidecar's return routing (tproxy.ingress) as data, and the config that asks for it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gate.capture import capture_of, rules_of
from gate.config import load_config, parse_config
from gate.errors import ConfigError
from tests.conftest import ROOT
from tproxy.ingress import needs_return_routing, return_chain, return_iptables
from tproxy.rules import Capture, IpRule, LocalRoute, build

INGRESS = Capture(mode="tproxy", role="ingress", port4=15001, port6=15006, bypass_mark=0x2, ports=((8080, 8080),),
                  preserve_source=True)


def test_nft_rule_set_adds_the_return_chain_to_the_tproxy_one() -> None:
    rules = build(INGRESS)
    assert rules.nft == """table inet ugate {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 meta mark set 0x1 accept
    meta mark 0x2 return
    fib daddr type != local return
    meta nfproto ipv4 meta l4proto tcp tcp dport 8080 tproxy ip to :15001 meta mark set 0x1 accept
    meta nfproto ipv6 meta l4proto tcp tcp dport 8080 tproxy ip6 to :15006 meta mark set 0x1 accept
    meta nfproto ipv4 meta l4proto tcp tcp dport 8080 drop comment "no gate serves: on_failure closed"
    meta nfproto ipv6 meta l4proto tcp tcp dport 8080 drop comment "no gate serves: on_failure closed"
  }
  chain ingress_return {
    type route hook output priority mangle; policy accept;
    meta mark 0x2 ct state new fib saddr type != local fib daddr type local ct mark set 0x1 comment "ugate as client"
    meta mark 0x0 ct direction reply ct mark 0x1 meta mark set 0x1 comment "app replies: to ugate"
  }
}
"""
    # the replies take TPROXY's own policy route: nothing else to add or clear
    assert rules.ip_rules == (IpRule(2, 0x1, 100), IpRule(10, 0x1, 100))
    assert rules.routes == (LocalRoute(2, 100), LocalRoute(10, 100))
    assert rules.ip_rules == build(dataclasses.replace(INGRESS, preserve_source=False)).ip_rules


def test_marks_and_table_follow_the_capture() -> None:
    chain = return_chain(dataclasses.replace(INGRESS, bypass_mark=0x40, route_mark=0x1000, table=7))
    assert "meta mark 0x40 ct state new" in chain and "ct mark set 0x1000" in chain
    assert "ct mark 0x1000 meta mark set 0x1000" in chain


@pytest.mark.parametrize("cap", [
    dataclasses.replace(INGRESS, preserve_source=False),  # the gate dials from its own address: replies are ours
    dataclasses.replace(INGRESS, role="router"),  # replies arrive from outside, through PREROUTING already
    dataclasses.replace(INGRESS, role="egress"),
    dataclasses.replace(INGRESS, mode="redirect"),  # refused by the config: no transparent socket to return to
], ids=["no-preserve", "router", "egress", "redirect"])
def test_only_a_preserving_tproxy_ingress_gets_return_routing(cap: Capture) -> None:
    assert not needs_return_routing(cap)
    assert return_chain(cap) == "" and return_iptables(cap) == ()
    assert "ingress_return" not in build(cap).nft
    if cap.mode == "tproxy":
        assert not any(r.chain == "UGATE_OUT" for r in build(dataclasses.replace(cap, backend="iptables")).iptables
                       if cap.role != "egress")


def test_iptables_rule_set_per_family() -> None:
    rules = build(dataclasses.replace(INGRESS, port6=None, backend="iptables"))
    assert [str(r) for r in rules.iptables if r.chain == "UGATE_OUT"] == [
        "iptables -t mangle -A UGATE_OUT -m addrtype ! --src-type LOCAL --dst-type LOCAL -m conntrack --ctstate NEW "
        "-m mark --mark 0x2 -j CONNMARK --set-xmark 0x1/0xffffffff",
        "iptables -t mangle -A UGATE_OUT -m connmark --mark 0x1 -m conntrack --ctdir REPLY -m mark --mark 0x0 "
        "-j MARK --set-xmark 0x1/0xffffffff",
    ]
    both = build(dataclasses.replace(INGRESS, backend="iptables")).iptables
    assert [r.ipv6 for r in both if r.chain == "UGATE_OUT"] == [False, False, True, True]
    assert "ip -6 rule add fwmark 0x1 lookup 100 priority 32000 proto 117" in build(
        dataclasses.replace(INGRESS, backend="iptables")).show()


def _config(listener: dict[str, object], **top: object) -> dict[str, Any]:
    return {"listeners": [{"name": "in4", "kind": "tproxy", "listen": "0.0.0.0:15001", **listener}],
            "capture": {"mode": "tproxy", "role": "ingress", "ports": [8080]}, **top}


def test_preserve_source_reaches_the_capture_from_a_listener_or_a_route() -> None:
    assert not capture_of(parse_config(_config({}))).preserve_source  # type: ignore[union-attr]
    assert capture_of(parse_config(_config({"preserve_source": True}))).preserve_source  # type: ignore[union-attr]
    by_route = _config({}, routes=[{"match": {"port": 8080}, "action": "direct", "preserve_source": True}])
    assert capture_of(parse_config(by_route)).preserve_source  # type: ignore[union-attr]


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return e.value.problems


def test_config_says_what_an_ingress_preserving_the_source_lacks() -> None:
    redirect = {"listeners": [{"name": "r", "kind": "redirect", "listen": "0.0.0.0:15001", "preserve_source": True}],
                "capture": {"mode": "redirect", "role": "ingress"}}
    assert any(p.startswith("capture.mode: preserve_source on an ingress sidecar (listeners[0] (r)) needs mode "
                            "tproxy") for p in problems(redirect))
    same_mark = _config({"preserve_source": True}, mark=1)
    assert any(p.startswith("config.mark: preserve_source on an ingress sidecar (listeners[0] (in4)) needs")
               for p in problems(same_mark))
    # the same configs in other roles are someone else's business
    parse_config({**redirect, "capture": {"mode": "redirect", "role": "router"}})


def test_a_loopback_upstream_cannot_answer_a_preserved_source() -> None:
    """Found in the namespaces: the app's SYN-ACK from 127.0.0.1 to the client is never routed (the kernel
    refuses a loopback source off lo before OUTPUT), so the connect times out; the config says so."""
    route = {"match": {"listener": "in4"}, "action": "upstream", "upstream": "127.0.0.1:8080"}
    for listener, extra, expected in (({"preserve_source": True}, {}, True), ({}, {"preserve_source": True}, True),
                                      ({}, {}, False)):
        raw = _config(listener, routes=[{**route, **extra}, {"action": "direct"}])
        if expected:
            assert "routes[0].upstream: 127.0.0.1:8080 is a loopback address, which cannot answer a client's " \
                   "address (preserve_source): use an interface's address" in problems(raw)
        else:
            parse_config(raw)
    # another listener's preserve_source does not reach a route limited to this one
    other = _config({}, routes=[{**route, "match": {"listener": "in4"}}])
    other["listeners"] = [*other["listeners"], {"name": "p6", "kind": "tproxy", "listen": "[::]:15006",
                                                 "preserve_source": True}]
    parse_config(other)
    parse_config(_config({"preserve_source": True}, routes=[{"action": "upstream", "upstream": "[::2]:80"}]))


def test_ugate_check_reports_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"listeners": [{"name": "r", "kind": "redirect", "listen": "0.0.0.0:15001"}],
                                    "capture": {"mode": "redirect", "role": "ingress"},
                                    "routes": [{"action": "direct", "preserve_source": True}]}))
    done = subprocess.run([sys.executable, "-m", "gate", "check", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "capture.mode: preserve_source on an ingress sidecar (routes[0]) needs mode tproxy" in done.stderr


def test_shipped_config_with_preserve_source_uncommented() -> None:
    """configs/ingress-sidecar.yaml as shipped, and with its commented preserve_source line turned on."""
    shipped = ROOT / "configs" / "ingress-sidecar.yaml"
    found = rules_of(load_config(shipped))
    assert found is not None and "ingress_return" not in found[1].nft
    text = shipped.read_text()
    assert "# preserve_source: true" in text
    on = yaml.safe_load(text.replace("# preserve_source: true", "preserve_source: true"))
    found = rules_of(parse_config(on))
    assert found is not None and "chain ingress_return" in found[1].show()
