"""The fast path sets, the bypass statements and their place in the rule set, as text (no root); the
parsers of nft's JSON listings on listings captured from nft 1.0.6; the session side's bookkeeping
with a recorded nft in place of the kernel."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.addr import Endpoint
from gate.capture import bypass_of, fastpath_of, rules_of
from gate.config import parse_config
from gate.flow import Close, Flow
from gate.router import Decision
from gate.udp.offload import UdpOffload
from gate.vocab import Action
from tests.conftest import ROOT
from tests.fuzzing import budget
from tproxy.offload import (
    MAX_ELEMENTS,
    Bypass,
    Counts,
    Tuple5,
    bypass_statements,
    canonical,
    element_script,
    parse_counts,
    parse_counts_text,
    parse_live,
    payload_bytes,
)
from tproxy.rules import Capture, build

NET = ipaddress.ip_network


def test_rule_set_with_fast_path_and_bypass() -> None:
    cap = Capture(mode="tproxy", role="router", port4=15001, port6=None, udp_port4=15002, bypass_mark=0x2,
                  interfaces=("lan0",), fastpath=((4, 30.0),), udp_owned=True,
                  bypass=(Bypass("lan", dst=(NET("10.9.0.0/16"),), ports=((22, 22), (8000, 8100))),))
    assert build(cap).nft == """table inet ugate {
  set fp4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; timeout 30000ms; size 65536; }
  set fpc4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; size 65536; counter; }
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    meta nfproto ipv4 meta l4proto udp ip saddr . udp sport . ip daddr . udp dport @fp4 ip saddr . udp sport . ip daddr . udp dport @fpc4 update @fp4 { ip saddr . udp sport . ip daddr . udp dport } accept comment "kernel fast path"
    meta l4proto tcp socket transparent 1 meta mark set 0x1 accept
    meta l4proto udp socket transparent 1 meta mark set 0x1 accept
    meta mark 0x2 return
    fib daddr type local return
    meta nfproto ipv4 meta l4proto { tcp, udp } ip daddr 10.9.0.0/16 th dport { 22, 8000-8100 } return comment "bypass: route lan"
    iifname "lan0" meta nfproto ipv4 meta l4proto tcp tproxy ip to :15001 meta mark set 0x1 accept
    iifname "lan0" meta nfproto ipv4 meta l4proto udp tproxy ip to :15002 meta mark set 0x1 accept
    iifname "lan0" meta nfproto ipv4 meta l4proto tcp drop comment "no gate serves: on_failure closed"
    iifname "lan0" meta nfproto ipv4 meta l4proto udp drop comment "no gate serves: on_failure closed"
  }
}
"""  # noqa: E501


def test_bypass_statements_per_family() -> None:
    both = Bypass("any-src", src=(NET("10.0.0.0/8"), NET("fd00::/8")))
    assert bypass_statements([both]) == [
        'meta nfproto ipv4 meta l4proto { tcp, udp } ip saddr 10.0.0.0/8 return comment "bypass: route any-src"',
        'meta nfproto ipv6 meta l4proto { tcp, udp } ip6 saddr fd00::/8 return comment "bypass: route any-src"']
    # a route whose dst is IPv4 and whose src is IPv6 matches no flow: nothing to compile
    assert bypass_statements([Bypass("never", dst=(NET("10.0.0.0/8"),), src=(NET("fd00::/8"),))]) == []
    assert bypass_statements([Bypass('say "hi"', ports=((53, 53),))])[0].endswith("comment \"bypass: route say 'hi'\"")


def test_egress_bypass_goes_into_the_output_chain() -> None:
    cap = Capture(mode="tproxy", role="egress", port4=15001, port6=None, bypass_mark=0x2,
                  bypass=(Bypass("b", dst=(NET("10.9.0.0/16"),)),))
    nft = build(cap).nft
    assert "set fp" not in nft  # the fast path is the router's
    output = nft.split("chain output")[1]
    assert output.index("bypass: route b") < output.index("meta l4proto tcp meta mark set 0x1")


def test_iptables_backend_refuses_what_it_cannot_do() -> None:
    cap = Capture(mode="tproxy", role="router", port4=15001, port6=None, bypass_mark=0x2, backend="iptables",
                  bypass=(Bypass("b"),))
    with pytest.raises(ValueError, match="nftables-only"):
        build(cap)


def test_element_script() -> None:
    t = Tuple5("10.0.0.1", 5000, "10.0.0.2", 53)
    assert element_script("ugate", [t, t.reverse()]) == (
        "add element inet ugate fp4 { 10.0.0.1 . 5000 . 10.0.0.2 . 53 }\n"
        "add element inet ugate fpc4 { 10.0.0.1 . 5000 . 10.0.0.2 . 53 }\n"
        "add element inet ugate fp4 { 10.0.0.2 . 53 . 10.0.0.1 . 5000 }\n"
        "add element inet ugate fpc4 { 10.0.0.2 . 53 . 10.0.0.1 . 5000 }\n")
    assert element_script("ugate", [Tuple5("fd00::1", 1, "fd00::2", 2)], add=False).startswith(
        "delete element inet ugate fp6 { fd00::1 . 1 . fd00::2 . 2 }")


# `nft -j list set` output of nft 1.0.6 (Linux 6.18), captured while a session was offloaded
LIVE = ('{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},'
        ' {"set": {"family": "inet", "name": "fp4", "table": "ugate", "type": ["ipv4_addr", "inet_service", '
        '"ipv4_addr", "inet_service"], "handle": 1, "size": 65536, "flags": ["timeout"], "timeout": 2, "elem": ['
        '{"elem": {"val": {"concat": ["10.77.1.2", 36726, "10.77.2.2", 9999]}, "expires": 1}}, '
        '{"elem": {"val": {"concat": ["10.77.2.2", 9999, "10.77.1.2", 36726]}, "expires": 1}}]}}]}')
COUNTS = ('{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", '
          '"json_schema_version": 1}}, {"set": {"family": "inet", "name": "fpc6", "table": "ugate", "type": '
          '["ipv6_addr", "inet_service", "ipv6_addr", "inet_service"], "handle": 4, "size": 65536, "elem": ['
          '{"elem": {"val": {"concat": ["fd77:1::2", 37470, "fd77:2::2", 9999]}, "counter": {"packets": 5, '
          '"bytes": 1240}}}], "stmt": [{"counter": null}]}}]}')


def test_parse_listings() -> None:
    up = Tuple5("10.77.1.2", 36726, "10.77.2.2", 9999)
    assert parse_live(LIVE, "fp4") == {up, up.reverse()}
    assert parse_live(LIVE, "fp6") == set()
    t6 = Tuple5("fd77:1::2", 37470, "fd77:2::2", 9999)
    assert parse_counts(COUNTS, "fpc6") == {t6: Counts(5, 1240)}
    assert payload_bytes(t6, Counts(5, 1240)) == 5 * 200  # 40 + 8 header bytes per IPv6 packet
    assert parse_live('{"nftables": [{"set": {"name": "fp4", "elem": [{"concat": ["10.0.0.1", 1, "10.0.0.2", 2]}]}}]}',
                      "fp4") == {Tuple5("10.0.0.1", 1, "10.0.0.2", 2)}


class FakeNft:
    """What the kernel's sets would hold: adds fail past ``capacity`` (the set's size bound)."""

    def __init__(self, capacity: int = MAX_ELEMENTS) -> None:
        self.capacity = capacity
        self.live_set: set[Tuple5] = set()
        self.count_set: dict[Tuple5, Counts] = {}

    def add(self, tuples: Any) -> None:
        tuples = list(tuples)
        if len(self.count_set) + len(tuples) > self.capacity:
            raise OSError("nft failed: Error: Could not process rule: Too many open files in system")
        for t in tuples:
            self.live_set.add(t)
            self.count_set[t] = Counts(0, 0)

    def revive(self, t: Tuple5) -> None:
        self.live_set.add(t)

    def delete(self, tuples: Any) -> None:
        for t in tuples:
            self.live_set.discard(t)
            self.count_set.pop(t, None)

    def live(self, version: int) -> set[Tuple5]:
        return set(self.live_set)

    def counts(self, tuples: Any) -> dict[Tuple5, Counts]:
        return {t: self.count_set[t] for t in tuples}

    def all_counts(self, version: int) -> dict[Tuple5, Counts]:
        return dict(self.count_set)

    def close(self) -> None:
        pass


def _route(**route: Any) -> Any:
    config = parse_config({"listeners": [{"name": "u", "kind": "tproxy_udp", "listen": "0.0.0.0:15002"}],
                           "routes": [route]})
    return config.routes[0]


def test_session_side_ends_with_the_kernel_counts_and_respects_the_set_bound() -> None:
    async def scenario() -> None:
        nft = FakeNft(capacity=2)  # room for one session (two tuples)
        finished: list[tuple[Flow, Close, str | None]] = []
        offload = UdpOffload(asyncio.get_running_loop(), 4, 1.0, lambda f, c, d: finished.append((f, c, d)),
                             nft_factory=lambda: nft)  # type: ignore[arg-type,return-value]
        assert offload.interval == 0.25  # a quarter of the session timeout
        route = _route(action="direct", preserve_source=True)
        decision = Decision(Action.DIRECT, route)
        assert offload.wants(decision)
        assert not offload.wants(Decision(Action.DIRECT, _route(action="direct")))  # gate's own address
        assert not offload.wants(Decision(Action.DIRECT, _route(action="direct", preserve_source=True,
                                                                offload="off")))
        first = Flow("u", Endpoint("10.0.0.1", 5000), Endpoint("10.0.0.2", 53), bytes_up=40, bytes_down=0)
        assert offload.offer(decision, first) and first.path == "kernel"
        second = Flow("u", Endpoint("10.0.0.1", 5001), Endpoint("10.0.0.2", 53))
        assert not offload.offer(decision, second)  # the set is full: this one stays in user space
        assert offload.refused == 1
        up = Tuple5("10.0.0.1", 5000, "10.0.0.2", 53)
        nft.live_set.discard(up.reverse())  # the answers' element expired on its own: added again
        await asyncio.sleep(0.35)
        assert up.reverse() in nft.live_set and not finished
        nft.count_set[up] = Counts(4, 4 * 128)  # IPv4: 28 header bytes per packet
        nft.count_set[up.reverse()] = Counts(2, 2 * 528)
        nft.live_set.discard(up)  # the client went quiet: its element expired
        await asyncio.sleep(0.3)
        assert finished == [(first, Close.IDLE, "kernel fast path: 4 packets up, 2 down forwarded by the kernel")]
        assert (first.bytes_up, first.bytes_down) == (40 + 4 * 100, 2 * 500)
        assert nft.live_set == set() and nft.count_set == {}
        assert offload.offer(decision, second)  # room again
        offload.shutdown()
        assert [c for _, c, _ in finished] == [Close.IDLE, Close.SHUTDOWN]

    asyncio.run(scenario())


# `nft get element` output of nft 1.0.6 (text even with -j)
GOT = ("table inet ugate {\n\tset fpc4 {\n\t\ttype ipv4_addr . inet_service . ipv4_addr . inet_service\n"
       "\t\tsize 65536\n\t\telements = { 10.0.0.2 . 2 . 10.0.0.1 . 1 counter packets 0 bytes 0,\n"
       "\t\t\t     10.0.0.1 . 1 . 10.0.0.2 . 2 counter packets 17 bytes 2176 }\n\t}\n}\n")


def test_parse_counts_text() -> None:
    assert parse_counts_text(GOT) == {Tuple5("10.0.0.2", 2, "10.0.0.1", 1): Counts(0, 0),
                                      Tuple5("10.0.0.1", 1, "10.0.0.2", 2): Counts(17, 2176)}
    assert parse_counts_text(GOT.replace("10.0.0.", "fd00:0:0:0:0:0:0:")) == {
        Tuple5("fd00::2", 2, "fd00::1", 1): Counts(0, 0), Tuple5("fd00::1", 1, "fd00::2", 2): Counts(17, 2176)}
    assert canonical("fd00:0::1") == "fd00::1" and canonical("10.0.0.1") == "10.0.0.1"
    with pytest.raises(ValueError):
        canonical("10.0.0.256")


CONFIG = """
listeners:
  - {name: tp4, kind: tproxy, listen: "0.0.0.0:15001"}
  - {name: udp4, kind: tproxy_udp, listen: "0.0.0.0:15002", session_timeout: 30}
  - {name: udp6, kind: tproxy_udp, listen: "[::]:15007", session_timeout: 20}
capture: {mode: tproxy, role: router, interfaces: [lan0]}
routes:
  - {name: lan, match: {dst: [10.9.0.0/16]}, action: direct, preserve_source: true}
  - {name: dns, match: {listener: [udp4], port: [53]}, action: direct, preserve_source: true}
  - {name: rest, action: direct}
"""


def test_config_to_rules(tmp_path: Path) -> None:
    import yaml

    config = parse_config(yaml.safe_load(CONFIG))
    assert fastpath_of(config) == ((4, 30.0), (6, 20.0))
    assert [b.name for b in bypass_of(config)] == ["lan"]
    found = rules_of(config)
    assert found is not None
    shown = found[1].show()
    assert "set fp6" in shown and 'comment "bypass: route lan"' in shown
    # iptables: nothing compiled, and an explicit offload: kernel is refused at check time
    raw = yaml.safe_load(CONFIG)
    raw["capture"]["backend"] = "iptables"
    config = parse_config(raw)
    assert fastpath_of(config) == () and bypass_of(config) == ()
    raw["routes"][0]["offload"] = "kernel"
    path = tmp_path / "ipt.yaml"
    path.write_text(json.dumps(raw))
    done = subprocess.run([sys.executable, "-m", "gate", "check", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "routes[0].offload: kernel is nftables-only (capture.backend iptables)" in (
        done.stderr), done.stderr


def test_rules_show_and_route_explain(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(CONFIG)

    def ugate(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "gate", *args, "--config", str(path)], cwd=ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    shown = ugate("rules", "show")
    assert ('meta nfproto ipv4 meta l4proto { tcp, udp } ip daddr 10.9.0.0/16 return comment "bypass: route lan"'
            in shown)
    assert shown.count('comment "kernel fast path"') == 2
    explained = ugate("route", "--listener", "tp4", "--dst", "10.9.1.1", "--port", "22").splitlines()
    assert explained[0] == "routes[0] lan: MATCH: direct" and explained[1].startswith("bypassed: ")
    explained = ugate("route", "--listener", "udp4", "--dst", "10.8.1.1", "--port", "53").splitlines()
    assert explained[1] == "routes[1] dns: MATCH: direct"
    assert explained[-1].startswith("kernel fast path: once routed")  # not a bypass: the gate routes it first


_ports = st.integers(0, 65535)
_v4 = st.ip_addresses(v=4).map(lambda a: canonical(str(a)))
_v6 = st.ip_addresses(v=6).map(lambda a: canonical(str(a)))
_tuples = st.one_of(st.builds(Tuple5, _v4, _ports, _v4, _ports), st.builds(Tuple5, _v6, _ports, _v6, _ports))


@budget(300)
@given(st.dictionaries(_tuples, st.tuples(st.integers(0, 2**40), st.integers(0, 2**50)), max_size=20))
def test_listings_round_trip(elements: dict[Tuple5, tuple[int, int]]) -> None:
    """Whatever tuples and counters the sets hold, the parsers give them back as nft 1.0.6 lists them."""
    def concat(t: Tuple5) -> dict[str, Any]:
        return {"concat": [t.src, t.sport, t.dst, t.dport]}

    live = {"nftables": [{"metainfo": {}}, {"set": {"name": "fp4", "elem": [
        {"elem": {"val": concat(t), "expires": 1}} for t in elements]}}]}
    counts = {"nftables": [{"set": {"name": "fpc4", "elem": [
        {"elem": {"val": concat(t), "counter": {"packets": p, "bytes": b}}} for t, (p, b) in elements.items()]}}]}
    assert parse_live(json.dumps(live), "fp4") == set(elements)
    assert parse_counts(json.dumps(counts), "fpc4") == {t: Counts(p, b) for t, (p, b) in elements.items()}
    assert parse_live(json.dumps(live), "fp6") == set()  # another set's name: nothing
