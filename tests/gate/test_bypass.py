"""Which routes compile to "do not capture": address-only, offloadable, and first-match exact."""

from __future__ import annotations

from typing import Any

import pytest

from gate.config import parse_config
from gate.errors import ConfigError
from gate.router import FlowKey, Router, bypass_routes

LISTENERS = [{"name": "tp", "kind": "tproxy", "listen": "0.0.0.0:15001"},
             {"name": "udp", "kind": "tproxy_udp", "listen": "0.0.0.0:15002"}]
FAST = {"action": "direct", "preserve_source": True}


def compiled(*routes: dict[str, Any]) -> list[str]:
    config = parse_config({"listeners": LISTENERS, "routes": [{"name": f"r{i}", **r} for i, r in enumerate(routes)]})
    return [r.name for r in bypass_routes(config.routes)]


@pytest.mark.parametrize(("routes", "expected"), [
    # address-only, direct, the client's source: compiled
    ([{"match": {"dst": ["10.0.0.0/8"], "port": [22]}, **FAST}], ["r0"]),
    ([{**FAST}], ["r0"]),  # "everything direct from the client": nothing is captured at all
    # not offloadable: the gate's own address, another action, offload off
    ([{"match": {"dst": ["10.0.0.0/8"]}, "action": "direct"}], []),
    ([{"match": {"dst": ["10.0.0.0/8"]}, "action": "reject"}], []),
    ([{"match": {"dst": ["10.0.0.0/8"]}, **FAST, "offload": "off"}], []),
    # not address-only: a name, a sniffed field, a listener
    ([{"match": {"dst": ["10.0.0.0/8"], "host": ["a.test"]}, **FAST}], []),
    ([{"match": {"dst": ["10.0.0.0/8"], "protocol": ["tls"]}, **FAST}], []),
    ([{"match": {"dst": ["10.0.0.0/8"], "listener": ["tp"]}, **FAST}], []),
    # first match: an earlier route left to user space that could match the same flows blocks it
    ([{"match": {"sni": ["x.test"]}, "action": "reject"}, {"match": {"dst": ["10.0.0.0/8"]}, **FAST}], []),
    ([{"match": {"dst": ["10.1.0.0/16"]}, "action": "reject"}, {"match": {"dst": ["10.0.0.0/8"]}, **FAST}], []),
    ([{"match": {"src": ["192.168.1.0/24"]}, "action": "reject"}, {"match": {"dst": ["10.0.0.0/8"]}, **FAST}], []),
    # ... but not one that cannot: disjoint destinations, ports, sources, or families
    ([{"match": {"dst": ["10.1.0.0/16"]}, "action": "reject"}, {"match": {"dst": ["10.2.0.0/16"]}, **FAST}], ["r1"]),
    ([{"match": {"port": [443]}, "action": "reject"}, {"match": {"port": ["1-442"]}, **FAST}], ["r1"]),
    ([{"match": {"port": ["400-500"]}, "action": "reject"}, {"match": {"port": ["1-400"]}, **FAST}], []),
    ([{"match": {"dst": ["fd00::/8"], "sni": ["x.test"]}, "action": "reject"},
      {"match": {"dst": ["10.0.0.0/8"]}, **FAST}], ["r1"]),
    ([{"match": {"src": ["10.1.0.0/16"]}, "action": "reject"},
      {"match": {"src": ["10.2.0.0/16"], "dst": ["10.1.0.0/16"]}, **FAST}], ["r1"]),
    # an earlier compiled route does not block (the flows it matches are bypassed either way)
    ([{"match": {"dst": ["10.0.0.0/8"]}, **FAST}, {"match": {"dst": ["10.1.0.0/16"]}, **FAST}], ["r0", "r1"]),
    # a later user-space route cannot take flows an earlier compiled one matched
    ([{"match": {"dst": ["10.0.0.0/8"]}, **FAST}, {"action": "reject"}], ["r0"]),
    # a blocked route blocks what follows it too
    ([{"match": {"dst": ["10.1.0.0/16"], "host": ["a.test"]}, **FAST}, {"match": {"dst": ["10.0.0.0/8"]}, **FAST}],
     []),
])
def test_bypass_routes(routes: list[dict[str, Any]], expected: list[str]) -> None:
    assert compiled(*routes) == expected


def test_explain_says_bypassed_only_when_asked() -> None:
    config = parse_config({"listeners": LISTENERS, "routes": [
        {"name": "lan", "match": {"dst": ["10.0.0.0/8"]}, **FAST}, {"name": "rest", "action": "direct"}]})
    router = Router(config.routes)
    key = FlowKey("tp", "192.168.1.2", "10.1.2.3", 80, None)
    assert router.explain(key) == ["routes[0] lan: MATCH: direct"]
    assert router.explain(key, bypass=True)[1].startswith("bypassed: the capture rules do not capture this flow")
    other = FlowKey("tp", "192.168.1.2", "11.1.2.3", 80, None)
    assert len(router.explain(other, bypass=True)) == 2  # rest: captured as before


def test_offload_kernel_needs_direct_with_the_clients_source() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"listeners": LISTENERS, "routes": [{"action": "direct", "offload": "kernel"}]})
    assert any("routes[0].offload: kernel needs action direct and preserve_source" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        parse_config({"listeners": LISTENERS, "routes": [{**FAST, "offload": "sometimes"}]})
    assert any("'sometimes' is not one of: kernel, off" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:  # no capture: nothing to hand flows to
        parse_config({"listeners": LISTENERS, "routes": [{**FAST, "offload": "kernel"}]})
    assert any("kernel is nftables-only (no capture section)" in p for p in e.value.problems)
