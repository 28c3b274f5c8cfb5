"""The admin listener end to end: /metrics checked by promtool and against a known workload (one process
and workers: 2), live flows listed and cut, routes explained, tokens enforced, bad input survived, and
``ugate flows`` / ``ugate peers`` against a running gate."""

from __future__ import annotations

import gc
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PAYLOAD, ROOT, curl, free_port

TOKEN = "s3cret-token-0123456789abcdef"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing (Debian package prometheus)")


def _request(port: int, path: str, method: str = "GET", token: str | None = TOKEN) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def _json(port: int, path: str, method: str = "GET") -> Any:
    status, body = _request(port, path, method)
    assert status == 200, (status, body)
    return json.loads(body)


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    found = 0.0
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        if metric == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            found += value
    return found


@pytest.fixture
def admin_gate(start_gate: Any, tmp_path: Path) -> Any:
    """``admin_gate(workers=1)``: a socks5 listener and a token-guarded admin listener."""

    def start(workers: int = 1, **extra: Any) -> Any:
        (tmp_path / "token").write_text(TOKEN + "\n")
        socks, admin = free_port(), free_port()
        gate = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"},
                           {"name": "adm", "kind": "admin", "listen": f"127.0.0.1:{admin}",
                            "token_file": str(tmp_path / "token"), "timeouts": {"handshake": 1}}],
                          routes=[{"match": {"dst": "192.0.2.0/24"}, "action": "reject", "name": "test-net"},
                                  {"action": "direct", "name": "out"}],
                          workers=workers, **extra)
        deadline = time.monotonic() + 15
        while gate.stderr().count("ugate ready") < workers:
            assert time.monotonic() < deadline, gate.stderr()
            time.sleep(0.05)
        gate.socks, gate.admin = socks, admin
        return gate

    return start


def _socks_open(port: int, dst_port: int) -> socket.socket:
    """A SOCKS5 CONNECT to 127.0.0.1:dst_port, left open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", dst_port))
    reply = s.recv(10)
    assert reply[:2] == b"\x05\x00", reply
    return s


@needs_promtool
@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_pass_promtool_and_match_the_workload(admin_gate: Any, http_origin: int, workers: int) -> None:
    gate = admin_gate(workers)
    flows = 6
    for _ in range(flows):
        got = curl("-f", "--socks5", f"127.0.0.1:{gate.socks}", f"http://127.0.0.1:{http_origin}/payload")
        assert got.returncode == 0 and len(got.stdout) == len(PAYLOAD)
    records = gate.wait_records(flows)
    assert len(records) == flows
    up, down = sum(r["bytes_up"] for r in records), sum(r["bytes_down"] for r in records)
    # with workers, each scrape lands on either worker (SO_REUSEPORT) and must sum both
    for _ in range(4 * workers):
        scraped = curl("-f", "-H", f"Authorization: Bearer {TOKEN}", f"http://127.0.0.1:{gate.admin}/metrics")
        assert scraped.returncode == 0, scraped.stderr
        check = subprocess.run(["promtool", "check", "metrics"], input=scraped.stdout, capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
        samples = _samples(scraped.stdout.decode())
        assert _total(samples, "ugate_flows_total", listener="socks", route="out", action="direct",
                      close="eof") == flows
        assert _total(samples, "ugate_flow_bytes_total", listener="socks", direction="up") == up
        assert _total(samples, "ugate_flow_bytes_total", listener="socks", direction="down") == down
        assert down > flows * len(PAYLOAD)
        assert samples["ugate_workers"] == workers
        assert _total(samples, "ugate_flows_active") == 0
        assert samples["ugate_process_open_fds"] > 0


def test_rejects_and_dial_errors_are_counted(admin_gate: Any) -> None:
    gate = admin_gate()
    closed = free_port()  # nothing listens: the connect is refused
    assert curl("--socks5", f"127.0.0.1:{gate.socks}", "http://192.0.2.1/").returncode != 0
    assert curl("--socks5", f"127.0.0.1:{gate.socks}", f"http://127.0.0.1:{closed}/").returncode != 0
    gate.wait_records(2)
    samples = _samples(_request(gate.admin, "/metrics")[1].decode())
    assert _total(samples, "ugate_flows_total", route="test-net", action="reject", close="rejected") == 1
    assert _total(samples, "ugate_flows_total", route="out", close="upstream error") == 1
    assert samples['ugate_dial_errors_total{kind="refused"}'] == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_flows_lists_live_flows_and_delete_cuts_them(admin_gate: Any, hash_echo: int, workers: int) -> None:
    """With workers, the flows are spread over both and each DELETE lands on either worker: /flows lists
    them all, and a cut reaches the worker holding the flow."""
    gate = admin_gate(workers)
    clients = {}
    for _ in range(1 if workers == 1 else 6):
        client = _socks_open(gate.socks, hash_echo)
        client.sendall(b"x" * 1000)
        clients[client.getsockname()[1]] = client
    deadline = time.monotonic() + 10
    while True:  # the relays count the bytes as they pass
        listed = [f for f in _json(gate.admin, "/flows")["flows"] if f["dst"] == f"127.0.0.1:{hash_echo}"]
        if (len(listed) == len(clients) and all(f["bytes_up"] == 1000 for f in listed)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sorted(int(f["client"].rsplit(":", 1)[1]) for f in listed) == sorted(clients)
    if workers == 2:
        assert len({f["pid"] for f in listed}) <= 2 and gate.proc.pid not in {f["pid"] for f in listed}
    for flow in listed:
        assert flow["listener"] == "socks" and flow["state"] == "relaying" and flow["rule"] == "out"
        assert flow["bytes_up"] == 1000 and flow["age"] >= 0 and flow["action"] == "direct"
        assert _json(gate.admin, f"/flows/{flow['id']}", "DELETE") == {"cut": flow["id"]}
        client = clients[int(flow["client"].rsplit(":", 1)[1])]
        client.settimeout(10)
        with pytest.raises(ConnectionResetError):
            while client.recv(65536):
                pass
        client.close()
        assert _request(gate.admin, f"/flows/{flow['id']}", "DELETE")[0] == 404
    records = gate.wait_records(len(clients))
    assert sorted(r["id"] for r in records) == sorted(f["flow"] for f in listed)
    assert {r["close"] for r in records} == {"cut"}
    assert _json(gate.admin, "/flows")["flows"] == []


def test_route_explains_as_ugate_route_does(admin_gate: Any) -> None:
    gate = admin_gate()
    answer = _json(gate.admin, "/route?listener=socks&dst=192.0.2.7:443")
    assert answer["decision"] == "routes[0] test-net: MATCH: reject"
    answer = _json(gate.admin, "/route?listener=socks&dst=example.com&port=443&sni=example.com")
    assert answer["explain"][-1] == "routes[1] out: MATCH: direct"
    cli = subprocess.run([sys.executable, "-m", "gate", "-c", str(Path(gate.access_path).parent / "gate0.yaml"),
                          "route", "--listener", "socks", "--dst", "example.com", "--port", "443"],
                         cwd=ROOT, capture_output=True, text=True)
    assert cli.stdout.splitlines() == answer["explain"]
    assert _request(gate.admin, "/route?listener=nope&dst=1.2.3.4:1")[0] == 404
    assert _request(gate.admin, "/route?listener=socks&dst=1.2.3.4")[0] == 400


def test_config_is_shown_with_secrets_redacted(start_gate: Any, tmp_path: Path) -> None:
    admin = free_port()
    gate = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{free_port()}",
                        "users": {"alice": "hunter2-password"}},
                       {"name": "adm", "kind": "admin", "listen": f"127.0.0.1:{admin}", "auth": "none"}])
    status, body = _request(admin, "/config", token=None)
    assert status == 200 and b"hunter2" not in body
    config = json.loads(body)
    assert config["listeners"][0]["users"] == {"alice": "<redacted>"}
    assert config["listeners"][1] ["kind"] == "admin" and config["listeners"][0]["listen"].endswith(
        str(gate.port("socks")))


def test_post_reload_applies_a_new_config_and_refuses_a_bad_one(start_gate: Any, tmp_path: Path) -> None:
    """POST /reload is the hot reload (gate.reload): the file's new routes are in force and shown at once;
    a config that fails validation is refused with its problems (409) and the running one stays."""
    admin = free_port()
    start_gate([{"name": "adm", "kind": "admin", "listen": f"127.0.0.1:{admin}", "auth": "none"}])
    path = tmp_path / "gate0.yaml"
    config = yaml.safe_load(path.read_text())
    config["routes"] = [{"name": "after-reload", "action": "reject"}]
    path.write_text(yaml.safe_dump(config))
    status, body = _request(admin, "/reload", "POST", token=None)
    assert status == 200 and "1 routes" in json.loads(body)["reloaded"], body
    assert json.loads(_request(admin, "/config", token=None)[1])["routes"][0]["name"] == "after-reload"
    path.write_text(yaml.safe_dump({**config, "routes": [{"action": "fly"}]}))
    status, body = _request(admin, "/reload", "POST", token=None)
    assert status == 409 and "routes[0].action" in json.loads(body)["problems"][0], body
    assert json.loads(_request(admin, "/config", token=None)[1])["routes"][0]["name"] == "after-reload"


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", f"Bearer {TOKEN}x",
                                    "Bearer"])
def test_unauthenticated_and_wrong_token_are_refused(admin_gate: Any, header: str | None) -> None:
    gate = admin_gate()
    for path, method in (("/metrics", "GET"), ("/flows", "GET"), ("/flows/1", "DELETE"), ("/config", "GET"),
                         ("/route?listener=socks&dst=1.2.3.4:1", "GET"), ("/peers", "GET"), ("/_local/flows", "GET")):
        conn = http.client.HTTPConnection("127.0.0.1", gate.admin, timeout=10)
        conn.request(method, path, headers={"Authorization": header} if header else {})
        answer = conn.getresponse()
        assert answer.status == 401 and answer.getheader("www-authenticate", "").startswith("Bearer"), path
        assert b"flows" not in answer.read()
        conn.close()
    assert _request(gate.admin, "/_local/flows")[0] == 404  # siblings' endpoints only on their private socket


def _raw(port: int, data: bytes, wait: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        if data:
            s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def test_bad_slow_and_oversized_requests_leave_it_serving(admin_gate: Any) -> None:
    gate = admin_gate()
    assert _request(gate.admin, "/metrics")[0] == 200
    gc.collect()
    baseline = gate.fd_count()
    assert _raw(gate.admin, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(gate.admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n").startswith(
        b"HTTP/1.1 431 ")
    assert _raw(gate.admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408 ")  # never ends
    assert _raw(gate.admin, b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                + b"z" * 100000).startswith(b"HTTP/1.1 413 ")
    assert _raw(gate.admin, b"").startswith(b"HTTP/1.1 408 ")  # a silent client too
    assert _raw(gate.admin, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")  # no Host (h11)
    assert _request(gate.admin, "/nope")[0] == 404
    assert _request(gate.admin, "/flows", "PUT")[0] == 405
    held = [socket.create_connection(("127.0.0.1", gate.admin)) for _ in range(80)]  # past MAX_CONNECTIONS
    for s in held:
        s.close()
    deadline = time.monotonic() + 10
    while _request(gate.admin, "/metrics")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _request(gate.admin, "/metrics")[0] == 200
    deadline = time.monotonic() + 10
    while gate.fd_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gate.fd_count() <= baseline
    assert gate.alive()


def test_unix_socket_admin_is_0600_and_needs_no_token(start_gate: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")
    start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{free_port()}"},
                {"name": "adm", "kind": "admin", "listen": path}], workers=2)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    got = curl("-f", "--unix-socket", path, "http://ugate/metrics")
    assert got.returncode == 0 and b"ugate_workers 2.0" in got.stdout


def test_ugate_flows_and_peers_commands(admin_gate: Any, hash_echo: int) -> None:
    gate = admin_gate()
    config = str(Path(gate.access_path).parent / "gate0.yaml")
    client = _socks_open(gate.socks, hash_echo)
    try:
        deadline = time.monotonic() + 10
        while not _json(gate.admin, "/flows")["flows"] and time.monotonic() < deadline:
            time.sleep(0.05)
        out = subprocess.run([sys.executable, "-m", "gate", "-c", config, "flows"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("1 flows") and lines[1].split()[:3] == ["ID", "LISTENER", "STATE"]
        assert re.match(rf"\d+-\d+\s+socks\s+relaying\s+127\.0\.0\.1:\d+\s+127\.0\.0\.1:{hash_echo}\s+out", lines[2])
        watch = subprocess.Popen([sys.executable, "-m", "gate", "-c", config, "flows", "--watch", "0.2"], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        seen = b""
        while seen.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:  # a screen, again and again
            seen += os.read(watch.stdout.fileno(), 65536)  # type: ignore[union-attr]
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0 and seen.count(b"\x1b[H\x1b[2J") >= 3 and b" socks " in seen
        watch.stdout.close()  # type: ignore[union-attr]
        watch.stderr.close()  # type: ignore[union-attr]
        wrong = subprocess.run([sys.executable, "-m", "gate", "flows", "--admin", f"http://127.0.0.1:{gate.admin}",
                                "--token", "not-the-token-at-all"], cwd=ROOT, capture_output=True, text=True,
                               timeout=30)
        assert wrong.returncode == 1 and "401" in wrong.stderr
        peers = subprocess.run([sys.executable, "-m", "gate", "-c", config, "peers"], cwd=ROOT, capture_output=True,
                               text=True, timeout=30)
        assert peers.returncode == 0 and peers.stdout.split() == ["PEER", "ADDRESS", "TUNNEL", "STREAMS", "LAST",
                                                                  "ERROR"]
    finally:
        client.close()


def test_peers_and_mesh_metrics_show_the_tunnel(start_gate: Any, tmp_path: Path, hash_echo: int) -> None:
    from tests.e2e.test_mesh import keygen

    keygen(tmp_path / "a")
    id_b, id_c = keygen(tmp_path / "b"), keygen(tmp_path / "c")
    h2_port, socks, admin = free_port(), free_port(), free_port()
    start_gate([{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2_port}"}],
               mesh={"identity": str(tmp_path / "b")},
               peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"),
                       "allow": [{"dst": ["127.0.0.1/32"], "port": [hash_echo]}]}])
    (tmp_path / "token").write_text(TOKEN)
    a = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"},
                    {"name": "adm", "kind": "admin", "listen": f"127.0.0.1:{admin}",
                     "token_file": str(tmp_path / "token")}],
                   routes=[{"via": "b", "name": "to-b"}], mesh={"identity": str(tmp_path / "a")},
                   peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b},
                          {"name": "c", "address": f"127.0.0.1:{free_port()}", "id": id_c}])
    (peers_before,) = [p for p in _json(admin, "/peers")["peers"] if p["name"] == "b"]
    assert not peers_before["up"]
    client = _socks_open(socks, hash_echo)
    try:
        (flow,) = _json(admin, "/flows")["flows"]
        assert flow["peer"] == "b" and flow["action"] == "via"
        peers = {p["name"]: p for p in _json(admin, "/peers")["peers"]}
        assert peers["b"]["up"] and peers["b"]["streams"] == {"h2": 1}
        assert peers["b"]["address"] == f"127.0.0.1:{h2_port}"
        assert not peers["c"]["up"]
        samples = _samples(_request(admin, "/metrics")[1].decode())
        assert samples['ugate_mesh_peer_up{peer="b"}'] == 1 and samples['ugate_mesh_peer_up{peer="c"}'] == 0
        assert samples['ugate_mesh_streams{peer="b",transport="h2"}'] == 1
        out = subprocess.run([sys.executable, "-m", "gate", "-c", str(Path(a.access_path).parent / "gate1.yaml"),
                              "peers"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert re.search(rf"^b\s+127\.0\.0\.1:{h2_port}\s+up\s+h2=1\s*$", out.stdout, re.M), out.stdout
        assert re.search(r"^c\s+\S+\s+down\s+h2=0", out.stdout, re.M), out.stdout
    finally:
        client.close()
