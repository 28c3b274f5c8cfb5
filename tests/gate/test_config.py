"""Config validation: good configs become frozen specs; every problem of a bad one is located."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from gate.addr import Endpoint
from gate.config import ForwardSpec, HttpSpec, Socks5Spec, load_config, parse_config
from gate.errors import ConfigError
from tests.conftest import ROOT

GATE_ID = "73tlqhtrwjbvyqqp55i7keo2tw4l7vjbq6o2dg5xdpkbcghostaq"  # as gate.mesh.identity.gate_id writes one


def problems(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return e.value.problems


def test_default_config_is_socks_and_http_on_loopback_all_direct() -> None:
    config = load_config(ROOT / "configs" / "gate.yaml")
    assert [(type(s), s.listen) for s in config.listeners] == [
        (Socks5Spec, Endpoint("127.0.0.1", 1080)),
        (HttpSpec, Endpoint("127.0.0.1", 3128)),
    ]
    assert [r.action for r in config.routes] == ["direct"]


def test_every_example_config_is_valid() -> None:
    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(path)


def test_full_listener_and_route_spellings() -> None:
    config = parse_config({
        "timeouts": {"connect": 3},
        "listeners": [
            {"name": "fwd", "kind": "forward", "listen": "[::1]:5201", "to": "example.test:5202",
             "relay": "copy", "max_flows": 10, "timeouts": {"idle": 7}},
            {"name": "s", "kind": "socks5", "listen": "0.0.0.0:1080", "users": {"alice": "pw"}},
        ],
        "routes": [
            {"match": {"host": "*.Blocked.test."}, "action": "reject"},
            {"match": {"listener": "fwd", "port": 5201}, "upstream": "127.0.0.1:5202"},
            {"match": {"dst": ["10.0.0.0/8", "fd00::/8"], "port": "8000-8999", "src": "192.168.1.7"},
             "action": "direct", "name": "lan"},
            {"action": "direct"},
        ],
    })
    fwd = config.listeners[0]
    assert isinstance(fwd, ForwardSpec)
    assert fwd.listen == Endpoint("::1", 5201) and fwd.to == Endpoint("example.test", 5202)
    assert fwd.timeouts.idle == 7 and fwd.timeouts.connect == 3 and fwd.relay == "copy"
    assert config.routes[0].match.host == ("*.blocked.test",)
    assert config.routes[1].action == "upstream" and config.routes[1].upstream == Endpoint("127.0.0.1", 5202)
    assert config.routes[2].match.port == ((8000, 8999),) and config.routes[2].name == "lan"
    assert config.routes[3].match.listener == ()


def test_routes_default_to_direct() -> None:
    config = parse_config({"listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1"}]})
    assert [r.action for r in config.routes] == ["direct"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1080"},
                        {"name": "b", "kind": "http", "listen": "x:99999"}]},
         "listeners[1].listen: 'x:99999' is not host:port"),
        ({"listeners": [{"name": "a", "kind": "ftp", "listen": "127.0.0.1:21"}]},
         "listeners[0].kind: 'ftp' is not one of: socks5, http, forward, tproxy, redirect, tproxy_udp, sni"),
        ({"listeners": [{"name": "a", "kind": "forward", "listen": "127.0.0.1:1"}]},
         "listeners[0].to: missing"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1", "relay": "fast"}]},
         "listeners[0].relay: 'fast' is not one of: auto, splice, copy"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1", "lsten": 1}]},
         "listeners[0].lsten: unknown key"),
        ({"listeners": []}, "listeners: expected a non-empty list"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1"}],
          "routes": [{"match": {"port": 70000}, "action": "direct"}]},
         "routes[0].match.port: 70000 is not a port or a range like 8000-8999"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1"}],
          "routes": [{"match": {"dst": "10.0.0.0/33"}, "action": "direct"}]},
         "routes[0].match.dst: '10.0.0.0/33' is not an IP address or CIDR"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1"}],
          "routes": [{"match": {"listener": "nope"}, "action": "direct"}]},
         "routes[0].match.listener: no listener is named 'nope'"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1"}],
          "routes": [{"match": {"host": "x"}}]},
         "routes[0]: needs an action"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1"}],
          "routes": [{"action": "upstream"}]},
         "routes[0].upstream: missing"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1"}],
          "routes": [{"action": "reject", "upstream": "1.2.3.4:5"}]},
         "routes[0].upstream: not allowed with action reject"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1"},
                        {"name": "a", "kind": "http", "listen": "127.0.0.1:1"}]},
         "listeners[1].name: 'a' is used twice"),
        ({"listeners": [{"name": "a", "kind": "socks5", "listen": "127.0.0.1:1", "timeouts": {"idle": -1}}]},
         "listeners[0].timeouts.idle: -1 is not a positive number of seconds"),
        ("just a string", "config: expected a mapping"),
    ],
)
def test_problems_are_located(raw: Any, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(raw)), problems(raw)


def test_all_problems_are_reported_at_once() -> None:
    found = problems({
        "listeners": [{"name": "a", "kind": "socks5", "listen": "nope"},
                      {"name": "b", "kind": "http", "listen": "127.0.0.1:0"}],
        "routes": [{"action": "teleport"}],
    })
    assert len(found) == 3, found


def test_unreadable_and_non_yaml_files(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_transparent_kinds_and_capture() -> None:
    from gate.config import RedirectSpec, TproxySpec, TproxyUdpSpec

    config = parse_config({
        "listeners": [
            {"name": "t4", "kind": "tproxy", "listen": "0.0.0.0:15001", "preserve_source": True},
            {"name": "t6", "kind": "tproxy", "listen": "[::]:15006"},
            {"name": "u4", "kind": "tproxy_udp", "listen": "0.0.0.0:15002", "mapping": "symmetric",
             "session_timeout": 30},
            {"name": "r", "kind": "redirect", "listen": "127.0.0.1:15003"},
        ],
        "capture": {"mode": "tproxy", "role": "router", "interfaces": ["lan0"], "ports": [80, "1000-2000"]},
        "routes": [{"match": {"dst": "10.0.0.0/8"}, "action": "direct", "preserve_source": True}],
    })
    t4, t6, u4, r = config.listeners
    assert isinstance(t4, TproxySpec) and t4.preserve_source and not t6.preserve_source
    assert isinstance(u4, TproxyUdpSpec) and (u4.mapping, u4.session_timeout) == ("symmetric", 30.0)
    assert isinstance(r, RedirectSpec)
    assert config.routes[0].preserve_source
    cap = config.capture
    assert cap is not None and (cap.port4, cap.port6, cap.udp_port4, cap.udp_port6) == (15001, 15006, 15002, None)
    assert config.mark == 0x2  # capture brings a default bypass mark


def test_udp_capture_needs_tproxy_mode() -> None:
    found = problems({"listeners": [{"name": "u", "kind": "tproxy_udp", "listen": "0.0.0.0:15002"},
                                    {"name": "r", "kind": "redirect", "listen": "0.0.0.0:15001"}],
                      "capture": {"mode": "redirect"}})
    assert any("tproxy_udp listeners need capture mode tproxy" in p for p in found), found
    found = problems({"listeners": [{"name": "u", "kind": "tproxy_udp", "listen": "0.0.0.0:1", "mapping": "cone"}]})
    assert any(p.startswith("listeners[0].mapping: 'cone' is not one of") for p in found), found


def test_sni_and_sniff_options() -> None:
    from gate.config import SniSpec

    config = parse_config({"listeners": [
        {"name": "in", "kind": "sni", "listen": "0.0.0.0:443", "port": 8443, "default": "10.0.0.9:443"},
        {"name": "f", "kind": "forward", "listen": "127.0.0.1:1", "to": "127.0.0.1:2", "sniff": True,
         "sniff_skip_ports": [25, "8000-8080"], "sniff_skip_dst": ["10.1.0.0/16", "fd00::/8"],
         "timeouts": {"sniff": 0.5}},
        {"name": "t", "kind": "tproxy", "listen": "0.0.0.0:15001"},
    ], "routes": [{"match": {"protocol": ["tls", "ssh"], "sni": "*.x.test", "alpn": "h2"}, "action": "direct"}]})
    sni, fwd, tp = config.listeners
    assert isinstance(sni, SniSpec) and sni.port == 8443 and sni.default == Endpoint("10.0.0.9", 443)
    assert fwd.sniff and fwd.sniff_skip_ports == ((25, 25), (8000, 8080)) and fwd.timeouts.sniff == 0.5
    sniffed = [fwd.sniffs(Endpoint(host, port)) for host, port in (
        ("10.2.0.1", 443), ("10.2.0.1", 25), ("10.2.0.1", 8080), ("10.1.3.4", 443), ("fd00::1", 443),
        ("2001:db8::1", 443), ("example.com", 443))]
    assert sniffed == [True, False, False, False, False, True, True]
    assert tp.sniffs(Endpoint("10.1.3.4", 443))  # no exclusions: everything is sniffed
    assert tp.sniff and not parse_config({"listeners": [{"name": "s", "kind": "socks5",
                                                         "listen": "127.0.0.1:1"}]}).listeners[0].sniff
    match = config.routes[0].match
    assert (match.protocol, match.sni, match.alpn) == (("tls", "ssh"), ("*.x.test",), ("h2",))
    assert any(p.startswith("routes[0].match.protocol: 'ftp' is not one of")
               for p in problems({"listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1"}],
                                  "routes": [{"match": {"protocol": "ftp"}, "action": "direct"}]}))


def test_route_proxy_protocol() -> None:
    config = parse_config({"listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1"}],
                           "routes": [{"action": "direct", "proxy_protocol": "v2"}]})
    assert config.routes[0].proxy_protocol == "v2"
    assert any(p.startswith("routes[0].proxy_protocol: 'v3' is not one of: v1, v2")
               for p in problems({"listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1"}],
                                  "routes": [{"action": "direct", "proxy_protocol": "v3"}]}))


def test_mesh_peers_and_via_routes() -> None:
    config = parse_config({
        "mesh": {"identity": "/etc/ugate/id", "window": 1 << 20},
        "peers": [{"name": "b", "address": "10.0.0.2:15008", "id": GATE_ID},
                  {"name": "a", "cert": "/etc/a.pem", "allow": [{"dst": ["10.96.0.0/12"], "port": [80, 443]}]}],
        "listeners": [{"name": "mesh", "kind": "h2", "listen": "0.0.0.0:15008"}],
        "routes": [{"match": {"port": [443]}, "via": "b"}, {"action": "direct"}],
    })
    assert config.mesh is not None and config.mesh.window == 1 << 20
    assert config.routes[0].action == "via" and config.routes[0].via == "b"
    b, a = config.peers
    assert b.address == Endpoint("10.0.0.2", 15008) and a.address is None and a.allow[0].port == ((80, 80), (443, 443))
    found = problems({
        "peers": [{"name": "b", "address": "10.0.0.2:1"}],
        "listeners": [{"name": "mesh", "kind": "h2", "listen": "0.0.0.0:15008"}],
        "routes": [{"via": "nobody"}, {"action": "via"}, {"action": "direct", "via": "b"}],
    })
    assert "peers: needs a mesh: section (this gate's identity)" in found
    assert "peers[0]: needs id: (pinned) or cert:, or a mesh.ca that signs its certificate" in found
    assert "routes[0].via: no peer is named 'nobody'" in found
    assert "routes[1].via: missing (action via needs via: PEER)" in found
    assert "routes[2].via: not allowed with action direct" in found
    assert any(p.startswith("mesh: missing: an h2 listener needs") for p in found)


def test_name_patterns_are_exact_star_dot_or_dot_suffixes() -> None:
    def config(pattern: str) -> dict[str, Any]:
        return {"listeners": [{"name": "t", "kind": "tproxy", "listen": "0.0.0.0:1"}],
                "routes": [{"match": {"sni": pattern}, "action": "direct"}]}

    for good, kept in (("example.com", "example.com"), ("*.example.com", "*.example.com"),
                       (".example.com", ".example.com"), ("Example.COM.", "example.com")):
        assert parse_config(config(good)).routes[0].match.sni == (kept,)
    for bad in ("*", ".", "..example.com", "a*b.example.com", ""):
        assert problems(config(bad)) == [f"routes[0].match.sni: {bad!r} is not a host name, *.suffix or .suffix"]


def test_words_are_typed_and_still_compare_as_strings() -> None:
    from gate.config import ACTIONS, RELAY_MODES, Action, CaptureMode, CaptureRole, LogAccess, RelayMode, UdpMapping

    config = parse_config({
        "listeners": [{"name": "t", "kind": "tproxy", "listen": "0.0.0.0:15001", "relay": "copy"},
                      {"name": "u", "kind": "tproxy_udp", "listen": "0.0.0.0:15002", "mapping": "symmetric"}],
        "capture": {"mode": "tproxy", "role": "egress"},
        "routes": [{"match": {"port": 25}, "action": "reject"}, {"action": "direct"}],
    })
    t, u = config.listeners
    assert t.relay is RelayMode.COPY and t.relay == "copy"
    assert u.mapping is UdpMapping.SYMMETRIC  # type: ignore[attr-defined]
    assert config.routes[0].action is Action.REJECT and config.routes[0].action == "reject"
    assert config.capture is not None and config.capture.mode is CaptureMode.TPROXY
    assert config.capture.role is CaptureRole.EGRESS and config.log.access is LogAccess.STDERR
    assert ACTIONS == ("direct", "upstream", "resolve", "reject", "via") and RELAY_MODES == ("auto", "splice", "copy")


def test_a_listener_kind_is_one_class() -> None:
    """A new kind registers itself and parses its own keys; nothing else names it. (Defined here with
    ClassVar imported at module level: dataclasses reads string annotations in the module's namespace.)"""
    from gate.config import ListenerSpec
    from gate.specs import KINDS
    from gate.validate import Problems, positive_int

    @dataclass(frozen=True)
    class EchoSpec(ListenerSpec):
        kind: ClassVar[str] = "echo-test"
        KEYS: ClassVar[tuple[str, ...]] = ("times",)
        times: int = 1

        @classmethod
        def options(cls, m: Any, where: str, p: Problems) -> dict[str, Any]:
            return {"times": p.get(m, "times", where, positive_int, 1)}

    try:
        config = parse_config({"listeners": [{"name": "e", "kind": "echo-test", "listen": "127.0.0.1:7",
                                              "times": 3}]})
        assert config.listeners[0] == EchoSpec(name="e", listen=Endpoint("127.0.0.1", 7),
                                               timeouts=config.timeouts, times=3)
        assert problems({"listeners": [{"name": "e", "kind": "echo-test", "listen": "127.0.0.1:7",
                                        "times": 0}]}) == ["listeners[0].times: 0 is not a positive integer"]
    finally:
        del KINDS["echo-test"]


def test_unquoted_off_turns_the_access_log_off() -> None:
    import yaml

    from gate.config import LogAccess

    def access(text: str) -> Any:
        return parse_config(yaml.safe_load(f"log: {{access: {text}}}\n"
                                           "listeners: [{name: s, kind: socks5, listen: '127.0.0.1:1'}]\n")).log.access

    assert access("off") is LogAccess.OFF  # YAML 1.1 reads it as false
    assert access('"off"') is LogAccess.OFF and access("stderr") is LogAccess.STDERR
    assert access("/var/log/ugate.log") == "/var/log/ugate.log"
    assert problems(yaml.safe_load("log: {access: on}\nlisteners: [{name: s, kind: socks5, listen: '127.0.0.1:1'}]")) \
        == ["log.access: true is not a place for the access log (stderr, off, or a file path)"]


def test_peer_trust_rules_visible_in_the_config() -> None:
    def peers(*entries: dict[str, Any], ca: bool = True) -> dict[str, Any]:
        return {"mesh": {"identity": "/id", **({"ca": "/ca.pem"} if ca else {})}, "peers": list(entries),
                "listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1"}]}

    ok = parse_config(peers({"name": GATE_ID}, {"name": "b", "id": GATE_ID.replace("7", "a", 1)},
                            {"name": f"{GATE_ID[:-1]}q.edge.cluster.local"}))
    assert [p.name for p in ok.peers] == [GATE_ID, "b", f"{GATE_ID[:-1]}q.edge.cluster.local"]
    assert problems(peers({"name": "b"})) == [
        "peers[0].name: 'b': a peer trusted through mesh.ca alone is named by its certificate: its gate ID or "
        "ID.NAMESPACE.cluster.local (or pin it with id: or cert:)"]
    assert problems(peers({"name": f"{GATE_ID}.edge.other.test"}))[0].startswith("peers[0].name: ")
    assert problems(peers({"name": "b", "id": GATE_ID}, ca=False)) == [
        "peers[0]: a gate pinned by id: alone can only be dialled (address:); to accept it, give its cert: or a "
        "mesh.ca that signs its certificate"]
    assert problems(peers({"name": "a", "id": GATE_ID}, {"name": "b", "id": GATE_ID})) == [
        "peers[1].id: is used twice (one gate, one peer entry)"]
