"""``ugate import gateway-api`` on the Gateway API project's own examples (tests/gate/data/gateway-api):
what ugate can serve becomes listeners and routes that ``ugate check`` accepts, the rest is reported, and
an imported TLS passthrough gateway routes real TLS by name."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from gate.config import load_config
from gate.gateway_api import convert

DATA = Path(__file__).parent / "data" / "gateway-api"
ROOT = Path(__file__).resolve().parents[2]


def load(*names: str) -> list[Any]:
    return [doc for name in names for doc in yaml.safe_load_all((DATA / name).read_text())]


def imported(tmp_path: Path, *names: str, **options: Any) -> tuple[dict[str, Any], list[str]]:
    """The converted config, checked by the gate's own loader, and the reports."""
    done = convert(load(*names), **options)
    path = tmp_path / "imported.yaml"
    path.write_text(yaml.safe_dump(done.config()))
    load_config(path)  # raises ConfigError listing every problem
    return done.config(), done.reports


def test_tls_passthrough_becomes_an_sni_listener_and_terminate_is_reported(tmp_path: Path) -> None:
    config, reports = imported(tmp_path, "tls-routing/gateway.yaml", "tls-routing/tls-route.yaml")
    assert config["listeners"] == [{"name": "example-gateway-tls", "kind": "sni", "listen": "0.0.0.0:443"}]
    assert config["routes"] == [
        {"name": "default/foo-route#0", "match": {"listener": ["example-gateway-tls"], "sni": ["foo.example.com"]},
         "upstream": "foo-svc.default.svc.cluster.local:443"},
        {"name": "example-gateway-tls-unmatched", "match": {"listener": ["example-gateway-tls"]}, "action": "reject"}]
    assert reports == ["not expressible: Gateway default/example-gateway listener tls-terminate (TLS mode "
                       "Terminate: ugate never terminates TLS)"]


def test_tcp_listeners_become_forwards_to_their_routes_backend(tmp_path: Path) -> None:
    config, reports = imported(tmp_path, "basic-tcp.yaml", cluster_domain="corp.example")
    assert [(li["name"], li["kind"], li["listen"], li["to"]) for li in config["listeners"]] == [
        ("my-tcp-gateway-foo", "forward", "0.0.0.0:8080", "my-foo-service.default.svc.corp.example:6000"),
        ("my-tcp-gateway-bar", "forward", "0.0.0.0:8090", "my-bar-service.default.svc.corp.example:6000")]
    assert reports == []
    config, _ = imported(tmp_path, "tcp-routing/gateway.yaml", "tcp-routing/tcp-route.yaml")
    assert config["listeners"][0]["to"] == "my-foo-service.default.svc.cluster.local:6000"


def test_http_routes_route_on_host_and_per_request_matches_are_reported_not_widened(tmp_path: Path) -> None:
    config, reports = imported(tmp_path, "http-routing/gateway.yaml", "http-routing/foo-httproute.yaml",
                               "http-routing/bar-httproute.yaml")
    assert config["listeners"][0]["sniff"] is True
    assert [(r["name"], r["match"].get("host"), r.get("upstream", r.get("action"))) for r in config["routes"]] == [
        ("default/example-route#0", ["example.com"], "example-svc.default.svc.cluster.local:80"),
        ("default/bar-route#1", ["bar.example.com"], "bar-svc.default.svc.cluster.local:8080"),
        ("example-gateway-http-unmatched", None, "reject")]
    # foo-route's only rule matches on a path: skipped (not routed more widely), and the route reported
    assert any("foo-route rules[0] (matches on path" in line for line in reports)
    assert any("foo-route (none of its rules can be expressed)" in line for line in reports)
    assert any("bar-route rules[0] (matches on headers" in line for line in reports)


def test_what_ugate_cannot_serve_is_reported_resource_by_resource(tmp_path: Path) -> None:
    done = convert(load("basic-udp.yaml", "wildcard-tls-gateway.yaml", "traffic-splitting/simple-split.yaml"))
    assert done.listeners == [] and done.routes == []
    joined = "\n".join(done.reports)
    for what in ("my-udp-gateway listener foo (protocol UDP", "UDPRoute default/udp-app-1",
                 "UDPRoute default/udp-app-2", "listener foo-https (protocol HTTPS", "listener wildcard-https",
                 "HTTPRoute default/simple-split (no parentRefs"):
        assert what in joined, what


def test_splits_namespaces_and_hostnames(tmp_path: Path) -> None:
    """Written here (the examples have no attached split): the heaviest backend takes all, reported;
    allowedRoutes Same refuses another namespace's route; a listener hostname narrows the route's."""
    gateway = {"kind": "Gateway", "metadata": {"name": "gw", "namespace": "infra"}, "spec": {"listeners": [
        {"name": "tls", "protocol": "TLS", "port": 8443, "hostname": "*.example.com", "tls": {"mode": "Passthrough"},
         "allowedRoutes": {"namespaces": {"from": "All"}}},
        {"name": "web", "protocol": "HTTP", "port": 8080}]}}
    split = {"kind": "TLSRoute", "metadata": {"name": "split", "namespace": "apps"}, "spec": {
        "parentRefs": [{"name": "gw", "namespace": "infra"}], "hostnames": ["a.example.com", "b.other.org"],
        "rules": [{"backendRefs": [{"name": "v1", "port": 443, "weight": 10},
                                   {"name": "v2", "port": 443, "weight": 90}]}]}}
    foreign = {"kind": "HTTPRoute", "metadata": {"name": "web", "namespace": "apps"}, "spec": {
        "parentRefs": [{"name": "gw", "namespace": "infra", "sectionName": "web"}],
        "rules": [{"backendRefs": [{"name": "site", "port": 80}]}]}}
    done = convert([gateway, split, foreign, {"kind": "GatewayClass", "metadata": {"name": "x"}}],
                   backends={"apps/v2": "10.0.0.7"})
    assert [r.get("upstream") for r in done.routes] == ["10.0.0.7:443", None]
    assert done.routes[0]["match"]["sni"] == ["a.example.com"]  # b.other.org is not within *.example.com
    joined = "\n".join(done.reports)
    assert "traffic split v1=10/v2=90 (all of it goes to v2)" in joined
    assert "not attached: HTTPRoute apps/web to gw-web (its allowedRoutes refuse it)" in joined
    assert "ignored: GatewayClass default/x" in joined


def test_the_command_prints_a_config_the_gate_runs_and_routes_tls_by_name(tmp_path: Path) -> None:
    """End to end: the imported TLS passthrough example, its Service pointed at a local TLS server and its
    port moved, routes foo.example.com there; another name is rejected (the gate drops what no route
    matches, as a Gateway does)."""
    server = _tls_server(tmp_path)
    port = server.getsockname()[1]
    gateway = (DATA / "tls-routing/gateway.yaml").read_text().replace("port: 443", "port: 18443")
    route = (DATA / "tls-routing/tls-route.yaml").read_text().replace("port: 443", f"port: {port}")
    (tmp_path / "gw.yaml").write_text(gateway)
    (tmp_path / "route.yaml").write_text(route)
    done = subprocess.run([sys.executable, "-m", "gate", "import", "gateway-api", str(tmp_path / "gw.yaml"),
                           str(tmp_path / "route.yaml"), "--listen-host", "127.0.0.1", "--backend",
                           "foo-svc=127.0.0.1"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "tls-terminate (TLS mode Terminate" in done.stderr
    config = yaml.safe_load(done.stdout)
    config["log"] = {"access": "off"}
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump(config))
    gate = subprocess.Popen([sys.executable, "-m", "gate", "--config", str(tmp_path / "gate.yaml")], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(18443)
        assert _tls_name(18443, "foo.example.com") == "foo.example.com"
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _tls_name(18443, "bar.example.com")
    finally:
        gate.terminate()
        gate.wait(10)
        server.close()


def _tls_server(tmp_path: Path) -> socket.socket:
    """A TLS server on loopback that answers each connection with the name the client asked for."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=foo.example.com",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem"), "-days", "1"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    names: dict[int, str] = {}
    context.sni_callback = lambda s, name, _: names.__setitem__(id(s), name or "")  # type: ignore[assignment,misc,func-returns-value]
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(names.get(id(tls), "").encode())
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return server


def _tls_name(port: int, name: str) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        return tls.recv(100).decode()


def _wait_port(port: int) -> None:
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")
