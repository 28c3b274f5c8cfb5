"""Rule sets as data: what `ugate rules show` prints is compared as text, without root."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path

import pytest

from gate.capture import rules_of
from gate.config import load_config, parse_config
from tests.conftest import ROOT
from tproxy.rules import Capture, IpRule, LocalRoute, build


def test_router_tproxy_rule_set() -> None:
    cap = Capture(mode="tproxy", role="router", port4=15001, port6=15006, bypass_mark=0x2, interfaces=("lan0",),
                  ports=((80, 80), (8000, 8999)), exclude=(ipaddress.ip_network("192.168.0.0/16"),))
    rules = build(cap)
    assert rules.nft == """table inet ugate {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set 0x1 accept
    meta mark 0x2 return
    fib daddr type local return
    meta nfproto ipv4 ip daddr 192.168.0.0/16 return
    iifname "lan0" meta nfproto ipv4 meta l4proto tcp tcp dport { 80, 8000-8999 } tproxy ip to :15001 meta mark set 0x1 accept
    iifname "lan0" meta nfproto ipv6 meta l4proto tcp tcp dport { 80, 8000-8999 } tproxy ip6 to :15006 meta mark set 0x1 accept
    iifname "lan0" meta nfproto ipv4 meta l4proto tcp tcp dport { 80, 8000-8999 } drop comment "no gate serves: on_failure closed"
    iifname "lan0" meta nfproto ipv6 meta l4proto tcp tcp dport { 80, 8000-8999 } drop comment "no gate serves: on_failure closed"
  }
}
"""
    assert rules.ip_rules == (IpRule(socket.AF_INET, 0x1, 100), IpRule(socket.AF_INET6, 0x1, 100))
    assert rules.routes == (LocalRoute(socket.AF_INET, 100), LocalRoute(socket.AF_INET6, 100))


def test_egress_tproxy_marks_in_output_and_steers_on_lo() -> None:
    rules = build(Capture(mode="tproxy", role="egress", port4=15001, port6=None, bypass_mark=0x2,
                          sources=(ipaddress.ip_network("10.0.0.0/8"),)))
    assert rules.nft == """table inet ugate {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set 0x1 accept
    iifname "lo" meta mark 0x1 meta nfproto ipv4 meta l4proto tcp tproxy ip to :15001 meta mark set 0x1 accept
    iifname "lo" meta mark 0x1 meta nfproto ipv4 meta l4proto tcp drop comment "no gate serves: on_failure closed"
  }
  chain output {
    type route hook output priority mangle; policy accept;
    meta mark 0x2 return
    fib daddr type local return
    meta nfproto ipv4 ip saddr != 10.0.0.0/8 return
    meta l4proto tcp meta mark set 0x1
  }
}
"""
    assert [r.family for r in rules.ip_rules] == [socket.AF_INET]


def test_redirect_needs_no_policy_routing() -> None:
    ingress = build(Capture(mode="redirect", role="ingress", port4=15001, port6=15006, bypass_mark=0x2,
                            ports=((22, 22),)))
    assert "type nat hook prerouting priority dstnat" in ingress.nft
    assert "fib daddr type != local return" in ingress.nft
    assert "meta nfproto ipv6 meta l4proto tcp tcp dport 22 redirect to :15006" in ingress.nft
    assert ingress.ip_rules == () and ingress.routes == ()


def test_show_is_what_apply_installs() -> None:
    found = rules_of(load_config(ROOT / "configs" / "home-router.yaml"))
    assert found is not None
    cap, rules = found
    shown = rules.show()
    assert rules.nft.rstrip() in shown
    assert "ip rule add fwmark 0x1 lookup 100 priority 32000 proto 117" in shown
    assert "ip -6 route add local ::/0 dev lo table 100 proto 117" in shown
    assert cap.bypass_mark == 0x2 and cap.port4 == 15001 and cap.port6 == 15006


def test_capture_config_problems() -> None:
    from gate.errors import ConfigError

    listeners = [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1080"}]
    for capture, expected in (
        ({"mode": "tproxy"}, "capture.mode: capture mode tproxy needs a listener of kind tproxy"),
        ({"mode": "bridge"}, "capture.mode: 'bridge' is not one of: tproxy, redirect"),
        ({"role": "router", "interfaces": ["lan 0"]}, "capture.interfaces: 'lan 0' is not an interface name"),
    ):
        try:
            parse_config({"listeners": listeners, "capture": capture})
        except ConfigError as e:
            assert any(p.startswith(expected) for p in e.problems), e.problems
        else:
            raise AssertionError("accepted")
    config = parse_config({"listeners": [{"name": "t", "kind": "tproxy", "listen": "0.0.0.0:15001"}],
                           "capture": {"mode": "tproxy"}, "mark": 7})
    assert config.mark == 7 and config.capture is not None and config.capture.port6 is None


def test_iptables_backend_rule_set() -> None:
    cap = Capture(mode="redirect", role="egress", port4=15001, port6=None, bypass_mark=0x2, ports=((443, 443),),
                  backend="iptables")
    rules = build(cap)
    assert rules.nft == "" and rules.ip_rules == ()
    assert list(map(str, rules.iptables)) == [
        "iptables -t nat -A UGATE_OUT -m mark --mark 0x2 -j RETURN",
        "iptables -t nat -A UGATE_OUT -m addrtype --dst-type LOCAL -j RETURN",
        "iptables -t nat -A UGATE_OUT -p tcp -m multiport --dports 443 -j REDIRECT --to-ports 15001",
    ]
    tproxy = build(Capture(mode="tproxy", role="router", port4=15001, port6=15006, bypass_mark=0x2,
                           interfaces=("lan0",), backend="iptables"))
    shown = tproxy.show()
    assert "iptables -t mangle -A UGATE_PRE -p tcp -m socket --transparent -j UGATE_DIVERT" in shown
    assert "ip6tables -t mangle -A UGATE_PRE -p tcp -i lan0 -j TPROXY --on-port 15006 --tproxy-mark 0x1/0x1" in shown
    assert "ip rule add fwmark 0x1 lookup 100 priority 32000 proto 117" in shown


def test_on_failure_open_is_an_owned_table_without_drops() -> None:
    """open: the table is created ``flags owner`` (the kernel deletes it with the gate's netlink socket),
    and nothing is dropped: a TPROXY rule with no socket behind it just does not match."""
    cap = Capture(mode="tproxy", role="router", port4=15001, port6=None, bypass_mark=0x2, udp_port4=15002,
                  interfaces=("lan0",), on_failure="open")
    rules = build(cap)
    assert rules.held
    assert rules.nft == """table inet ugate {
  flags owner
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set 0x1 accept
    meta mark 0x2 return
    fib daddr type local return
    iifname "lan0" meta nfproto ipv4 meta l4proto tcp tproxy ip to :15001 meta mark set 0x1 accept
    iifname "lan0" meta nfproto ipv4 meta l4proto udp tproxy ip to :15002 meta mark set 0x1 accept
  }
}
"""
    redirect = build(Capture(mode="redirect", role="egress", port4=15001, port6=None, bypass_mark=0x2,
                             on_failure="open"))
    assert redirect.held and redirect.nft.startswith("table inet ugate {\n  flags owner\n  chain output {")


def test_on_failure_closed_drops_udp_too_and_redirect_is_refused_by_the_kernel() -> None:
    closed = build(Capture(mode="tproxy", role="ingress", port4=None, port6=15006, bypass_mark=0x2,
                           udp_port6=15007, ports=((53, 53),)))
    assert not closed.held and "flags owner" not in closed.nft
    assert closed.nft.splitlines()[-4:-2] == [
        '    meta nfproto ipv6 meta l4proto tcp tcp dport 53 drop comment "no gate serves: on_failure closed"',
        '    meta nfproto ipv6 meta l4proto udp udp dport 53 drop comment "no gate serves: on_failure closed"']
    # REDIRECT rewrites the destination whether or not anything listens: the client is refused (RST)
    redirect = build(Capture(mode="redirect", role="router", port4=15001, port6=None, bypass_mark=0x2))
    assert " drop" not in redirect.nft and not redirect.held


def test_on_failure_config() -> None:
    from gate.errors import ConfigError

    listeners = [{"name": "t", "kind": "tproxy", "listen": "0.0.0.0:15001"}]
    config = parse_config({"listeners": listeners, "capture": {"mode": "tproxy"}})
    assert config.capture is not None and config.capture.on_failure == "closed"  # the default: a kill switch
    found = rules_of(parse_config({"listeners": listeners,
                                   "capture": {"mode": "tproxy", "apply": "auto", "on_failure": "open"}}))
    assert found is not None and found[0].on_failure == "open" and found[1].held
    for capture, expected in (
        ({"on_failure": "ajar"}, "capture.on_failure: 'ajar' is not one of: closed, open"),
        ({"on_failure": "open", "apply": "auto", "backend": "iptables"}, "capture.on_failure: open needs backend nftables"),
        ({"on_failure": "open"}, "capture.on_failure: open needs apply: auto"),
    ):
        try:
            parse_config({"listeners": listeners, "capture": {"mode": "tproxy", **capture}})
        except ConfigError as e:
            assert any(p.startswith(expected) for p in e.problems), e.problems
        else:
            raise AssertionError(f"accepted {capture}")


def test_rules_apply_refuses_rules_that_would_die_with_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ugate rules apply`` of on_failure: open would install a table owned by the CLI process, gone as
    it exits: refused before anything is touched (so no root is needed to test it)."""
    from gate.cli import main

    config = tmp_path / "gate.yaml"
    config.write_text(json.dumps({"listeners": [{"name": "t", "kind": "tproxy", "listen": "0.0.0.0:15001"}],
                                  "capture": {"mode": "tproxy", "apply": "auto", "on_failure": "open"}}))
    assert main(["rules", "apply", "--config", str(config)]) == 2
    assert "on_failure: open" in capsys.readouterr().err
    assert main(["rules", "show", "--config", str(config)]) == 0
    assert "  flags owner\n" in capsys.readouterr().out
