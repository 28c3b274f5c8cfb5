"""What the admin API shows: flows with live bytes, peers merged over workers, secrets redacted."""

from __future__ import annotations

from gate.addr import Endpoint
from gate.admin.views import REDACTED, config_view, flow_view, merge_peers, peer_rows
from gate.config import parse_config
from gate.flow import Flow


def test_flow_view_fields() -> None:
    flow = Flow("socks", Endpoint("::1", 5000), dst=Endpoint("example.com", 443), host="example.com",
                protocol="tls", sni="example.com", alpn=("h2",), started=100.0)
    flow.bytes_up = 7
    view = flow_view(flow, 102.5, 42)
    assert view["id"] == f"42-{flow.id}" and view["flow"] == flow.id and view["pid"] == 42
    assert view["client"] == "[::1]:5000" and view["dst"] == "example.com:443" and view["alpn"] == ["h2"]
    assert view["age"] == 2.5 and view["bytes_up"] == 7 and view["state"] == "accepted"


def test_peers_merge_over_workers() -> None:
    one = peer_rows([("b", Endpoint("10.0.0.2", 8443), True, 2, ""), ("c", None, False, 0, "refused")])
    two = peer_rows([("b", Endpoint("10.0.0.2", 8443), False, 0, "timeout"), ("c", None, False, 0, "")])
    merged = {p["name"]: p for p in merge_peers([one, two])}
    assert merged["b"]["up"] and merged["b"]["workers_up"] == 1 and merged["b"]["streams"] == {"h2": 2}
    assert not merged["c"]["up"] and merged["c"]["last_error"] == "refused" and merged["c"]["address"] is None


def test_config_view_redacts_passwords_only() -> None:
    config = parse_config({"listeners": [
        {"name": "s", "kind": "socks5", "listen": "127.0.0.1:1080", "users": {"alice": "pw-alice"}},
        {"name": "h", "kind": "http", "listen": "[::1]:3128", "users": {"bob": "pw-bob"}},
        {"name": "a", "kind": "admin", "listen": "/run/a.sock", "token_env": "TOKEN_VAR"}]})
    view = config_view(config)
    assert "pw-" not in repr(view)
    assert view["listeners"][0]["users"] == {"alice": REDACTED} and view["listeners"][1]["listen"] == "[::1]:3128"
    assert view["listeners"][2]["listen"] == "/run/a.sock" and view["listeners"][2]["token_env"] == "TOKEN_VAR"
    assert view["listeners"][2]["kind"] == "admin" and view["routes"][0]["action"] == "direct"
