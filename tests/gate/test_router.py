"""Routing: first match wins; explain says why each earlier route did not match."""

from __future__ import annotations

import pytest

from gate.addr import Endpoint
from gate.config import parse_config
from gate.router import FlowKey, Router

CONFIG = parse_config({
    "listeners": [
        {"name": "socks", "kind": "socks5", "listen": "127.0.0.1:1080"},
        {"name": "fwd", "kind": "forward", "listen": "127.0.0.1:5201", "to": "127.0.0.1:5202"},
    ],
    "routes": [
        {"name": "blocked", "match": {"host": "*.blocked.test"}, "action": "reject"},
        {"name": "exact", "match": {"host": "exact.test"}, "upstream": "127.0.0.1:9000"},
        {"name": "fwd-iperf", "match": {"listener": "fwd", "port": 5201}, "upstream": "127.0.0.1:5202"},
        {"name": "lan", "match": {"dst": ["10.0.0.0/8", "fd00::/8"], "port": "8000-8999"}, "action": "direct"},
        {"name": "from-guest", "match": {"src": "192.168.7.0/24"}, "action": "reject"},
        {"name": "rest", "action": "direct"},
    ],
})
ROUTER = Router(CONFIG.routes)


@pytest.mark.parametrize(
    ("key", "rule", "action"),
    [
        (FlowKey("socks", "127.0.0.1", "www.blocked.test", 443, "www.blocked.test"), "blocked", "reject"),
        (FlowKey("socks", "127.0.0.1", "blocked.test", 443, "blocked.test"), "rest", "direct"),  # suffix only
        (FlowKey("socks", "127.0.0.1", "EXACT.test", 80, "EXACT.test"), "exact", "upstream"),
        (FlowKey("socks", "127.0.0.1", "1.2.3.4", 80, "exact.test"), "exact", "upstream"),
        (FlowKey("fwd", "127.0.0.1", "127.0.0.1", 5201, None), "fwd-iperf", "upstream"),
        (FlowKey("socks", "127.0.0.1", "127.0.0.1", 5201, None), "rest", "direct"),
        (FlowKey("socks", "127.0.0.1", "10.1.2.3", 8080, None), "lan", "direct"),
        (FlowKey("socks", "127.0.0.1", "fd00::1", 8999, None), "lan", "direct"),
        (FlowKey("socks", "127.0.0.1", "10.1.2.3", 9000, None), "rest", "direct"),
        (FlowKey("socks", "127.0.0.1", "lan.example", 8080, "lan.example"), "rest", "direct"),  # name, not IP
        (FlowKey("socks", "192.168.7.9", "1.1.1.1", 53, None), "from-guest", "reject"),
        (FlowKey("socks", "::ffff:192.168.7.9", "1.1.1.1", 53, None), "from-guest", "reject"),  # v4-mapped
    ],
)
def test_first_match_wins(key: FlowKey, rule: str, action: str) -> None:
    decision = ROUTER.decide(key)
    assert (decision.rule, decision.action) == (rule, action)


def test_no_route_matched_rejects() -> None:
    router = Router(CONFIG.routes[:1])
    decision = router.decide(FlowKey("socks", None, "1.2.3.4", 80, None))
    assert (decision.action, decision.rule, decision.route) == ("reject", "no-match", None)


def test_explain_lists_each_route_tried() -> None:
    lines = ROUTER.explain(FlowKey("socks", "127.0.0.1", "10.1.2.3", 8080, None))
    assert lines == [
        "routes[0] blocked: no: host '(none)' does not match ['*.blocked.test']",
        "routes[1] exact: no: host '(none)' does not match ['exact.test']",
        "routes[2] fwd-iperf: no: listener 'socks' not in ['fwd']",
        "routes[3] lan: MATCH: direct",
    ]


SNIFF_ROUTER = Router(parse_config({
    "listeners": [{"name": "t", "kind": "tproxy", "listen": "0.0.0.0:15001"}],
    "routes": [
        {"name": "ssh", "match": {"protocol": "ssh"}, "action": "reject"},
        {"name": "h2", "match": {"sni": "*.example.test", "alpn": ["h2"]}, "upstream": "10.0.0.2:443"},
        {"name": "plain", "match": {"protocol": ["http", "unknown"]}, "action": "direct"},
        {"name": "rest", "action": "direct"},
    ],
}).routes)


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        (FlowKey("t", "10.0.0.1", "1.2.3.4", 22, None, "ssh"), "ssh"),
        (FlowKey("t", "10.0.0.1", "1.2.3.4", 443, "a.example.test", "tls", "a.example.test", ("h2", "http/1.1")), "h2"),
        (FlowKey("t", "10.0.0.1", "1.2.3.4", 443, "a.example.test", "tls", "a.example.test", ("http/1.1",)), "rest"),
        (FlowKey("t", "10.0.0.1", "1.2.3.4", 80, "web.test", "http"), "plain"),
        (FlowKey("t", "10.0.0.1", "1.2.3.4", 25, None, None), "rest"),  # not sniffed: protocol routes skip it
    ],
)
def test_sniffed_fields_route(key: FlowKey, rule: str) -> None:
    assert SNIFF_ROUTER.decide(key).rule == rule


def test_explain_names_sniffed_fields() -> None:
    lines = SNIFF_ROUTER.explain(FlowKey("t", None, "1.2.3.4", 443, None, "tls", "x.other.test", ("h2",)))
    assert lines[0] == "routes[0] ssh: no: protocol tls not in ['ssh']"
    assert lines[1] == "routes[1] h2: no: sni 'x.other.test' does not match ['*.example.test']"


TUNNEL_ROUTER = Router(parse_config({
    "listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1080"}],
    "routes": [
        {"name": "mail", "match": {"port": [25]}, "action": "reject"},
        {"name": "lan", "match": {"dst": ["10.0.0.0/8"]}, "action": "direct"},
        {"name": "named", "match": {"host": "*.corp.test"}, "upstream": "10.9.9.9:443"},
        {"name": "tls", "match": {"port": [443], "protocol": "tls"}, "action": "direct"},
        {"name": "rest", "action": "reject"},
    ],
}).routes)


@pytest.mark.parametrize(
    ("dst", "port", "host", "needed"),
    [
        ("mail.test", 25, "mail.test", False),  # rejected on the port whatever is said
        ("10.1.2.3", 443, None, False),  # "lan" wins on the address
        ("a.corp.test", 443, "a.corp.test", False),  # the requested name settles "named"
        ("1.2.3.4", 443, None, True),  # an address: a sniffed SNI could still match "named"
        ("www.test", 443, "www.test", True),  # "tls" needs the protocol
        ("www.test", 80, "www.test", False),  # only "rest" can match port 80
    ],
)
def test_needs_sniff_only_when_sniffed_fields_could_change_the_decision(
        dst: str, port: int, host: str | None, needed: bool) -> None:
    assert TUNNEL_ROUTER.needs_sniff(FlowKey("s", "127.0.0.1", dst, port, host)) is needed


RESOLVE_ROUTER = Router(parse_config({
    "listeners": [{"name": "t", "kind": "tproxy", "listen": "0.0.0.0:15001"}],
    "routes": [{"name": "by-name", "match": {"sni": "*.cdn.test"}, "action": "resolve"},
               {"name": "names", "match": {"port": 8443}, "action": "resolve"},
               {"name": "rest", "action": "direct"}],
}).routes)


def test_resolve_dials_the_name_on_the_original_port() -> None:
    key = FlowKey("t", "10.0.0.1", "1.2.3.4", 443, "a.cdn.test", "tls", "a.cdn.test")
    decision = RESOLVE_ROUTER.decide(key)
    assert (decision.action, decision.upstream) == ("resolve", Endpoint("a.cdn.test", 443))
    assert RESOLVE_ROUTER.explain(key)[-1] == "routes[0] by-name: MATCH: resolve -> a.cdn.test:443"


def test_resolve_without_a_name_keeps_the_original_destination() -> None:
    key = FlowKey("t", "10.0.0.1", "1.2.3.4", 8443, None, "unknown")
    assert RESOLVE_ROUTER.decide(key).upstream is None
    assert RESOLVE_ROUTER.explain(key)[-1] == (
        "routes[1] names: MATCH: resolve (no name known: the original destination)")


def test_a_resolve_route_needs_the_sniffed_name() -> None:
    router = Router(RESOLVE_ROUTER.routes[1:])  # "names" resolves whatever name port 8443 flows carry
    assert router.needs_sniff(FlowKey("t", "10.0.0.1", "1.2.3.4", 8443, None))  # the name is the target
    assert not router.needs_sniff(FlowKey("t", "10.0.0.1", "www.test", 8443, "www.test"))  # known already
    assert not router.needs_sniff(FlowKey("t", "10.0.0.1", "1.2.3.4", 443, None))  # only "rest" can match


@pytest.mark.parametrize(
    ("config", "key", "rule", "upstream"),
    [
        ("sni-ingress", FlowKey("tls", "1.2.3.4", None, None, "api.example.com", "tls", "api.example.com"),
         "api", Endpoint("10.20.0.21", 8443)),
        ("sni-ingress", FlowKey("tls", "1.2.3.4", None, None, "x.apps.example.com", "tls", "x.apps.example.com",
                                ("h2",)), "apps", Endpoint("10.20.0.30", 443)),
        ("sni-ingress", FlowKey("tls", "1.2.3.4", None, None, "evil.test", "tls", "evil.test"), "unknown-names", None),
        ("sni-ingress", FlowKey("web", "1.2.3.4", "10.20.0.10", 80, "old.example.com", "http"), "legacy-host",
         Endpoint("10.20.0.99", 80)),
        ("mux", FlowKey("one-port", "1.2.3.4", "127.0.0.1", 22, None, "ssh"), "ssh", None),
        ("mux", FlowKey("one-port", "1.2.3.4", "192.168.1.1", 80, None, "socks"), "no-lan", None),
        ("mux", FlowKey("one-port", "1.2.3.4", "www.example.com", 443, "www.example.com", "tls", "www.example.com"),
         "own-site", Endpoint("127.0.0.1", 4443)),
    ],
)
def test_example_configs_route_as_their_comments_say(config: str, key: FlowKey, rule: str,
                                                     upstream: Endpoint | None) -> None:
    from gate.config import load_config
    from tests.conftest import ROOT

    decision = Router(load_config(ROOT / "configs" / f"{config}.yaml").routes).decide(key)
    assert (decision.rule, decision.upstream) == (rule, upstream)


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("example.com", "example.com", True), ("example.com", "www.example.com", False),
        ("*.example.com", "www.example.com", True), ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False), ("*.example.com", "badexample.com", False),
        (".example.com", "example.com", True), (".example.com", "www.example.com", True),
        (".example.com", "badexample.com", False), (".example.com", "example.com.evil", False),
    ],
)
def test_name_patterns(pattern: str, name: str, matches: bool) -> None:
    router = Router(parse_config({"listeners": [{"name": "t", "kind": "tproxy", "listen": "0.0.0.0:15001"}],
                                  "routes": [{"name": "p", "match": {"sni": pattern}, "action": "direct"}]}).routes)
    key = FlowKey("t", "10.0.0.1", "1.2.3.4", 443, name, "tls", name)
    assert (router.decide(key).rule == "p") is matches
