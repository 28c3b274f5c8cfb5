"""Gate to gate over HTTP/2 with mutual TLS: client -> gate A (socks5, forward) -> tunnel -> gate B -> server.

On loopback: the mesh's TLS, HTTP/2 and stream semantics do not depend on namespaces; the capture
listeners that feed a tunnel are the same code as for direct flows (tested in test_capture).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PAYLOAD, ROOT, curl, free_port


def keygen(directory: Path, *extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gate", "keygen", "--dir", str(directory), *extra], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return out.split()[1]  # "id: <ID>"


@pytest.fixture
def two_gates(start_gate: Any, tmp_path: Path, http_origin: int, hash_echo: int) -> dict[str, Any]:
    """Gate B serves h2 and may reach the two origins only; gate A sends everything via B."""
    id_a, id_b = keygen(tmp_path / "a"), keygen(tmp_path / "b")
    h2_port, socks, fwd = free_port(), free_port(), free_port()
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2_port}"}],
        routes=[{"match": {"port": [hash_echo]}, "action": "direct", "name": "echo"},
                {"match": {"port": [1]}, "action": "reject", "name": "closed"},
                {"action": "direct", "name": "out"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"),
                "allow": [{"dst": ["127.0.0.1/32"], "port": [http_origin, hash_echo, 1, 9]}]}],
    )
    a = start_gate(
        [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"},
         {"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{fwd}", "to": f"127.0.0.1:{hash_echo}"}],
        routes=[{"via": "b", "name": "to-b"}],
        mesh={"identity": str(tmp_path / "a")},
        peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b}],
    )
    return {"a": a, "b": b, "socks": socks, "fwd": fwd, "id_a": id_a, "id_b": id_b, "h2": h2_port}


def test_keygen_writes_a_private_key_and_an_id_from_the_public_key(tmp_path: Path) -> None:
    ident = keygen(tmp_path / "k", "--namespace", "ns1", "--trust-domain", "example.test")
    assert os.stat(tmp_path / "k" / "key.pem").st_mode & 0o777 == 0o600
    assert len(ident) == 52 and ident == ident.lower()
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "k" / "cert.pem"), "-noout", "-text"],
                          check=True, capture_output=True, text=True).stdout
    assert f"DNS:{ident}.ns1.example.test" in text and f"URI:spiffe://example.test/ns/ns1/gate/{ident}" in text
    der = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "k" / "cert.pem"), "-pubkey", "-noout"],
                         check=True, capture_output=True).stdout
    spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=der, check=True,
                          capture_output=True).stdout
    import base64
    assert base64.b32encode(hashlib.sha256(spki).digest()).decode().rstrip("=").lower() == ident
    again = subprocess.run([sys.executable, "-m", "gate", "keygen", "--dir", str(tmp_path / "k")], cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr  # never silently replaces an identity


def test_flows_cross_the_tunnel_byte_exact(two_gates: dict[str, Any], http_origin: int) -> None:
    a, socks, fwd = two_gates["a"], two_gates["socks"], two_gates["fwd"]
    got = curl("-x", f"socks5h://127.0.0.1:{socks}", f"http://127.0.0.1:{http_origin}/payload")
    assert got.returncode == 0 and hashlib.sha256(got.stdout).digest() == hashlib.sha256(PAYLOAD).digest()
    blob = os.urandom(3 << 20)
    with socket.create_connection(("127.0.0.1", fwd), timeout=20) as s:  # upload, then half-close
        s.sendall(blob)
        s.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.decode() == f"{hashlib.sha256(blob).hexdigest()} {len(blob)}"
    records = a.wait_records(2)
    assert [r["action"] for r in records] == ["via", "via"] and all(r["rule"] == "to-b" for r in records)
    b_records = two_gates["b"].wait_records(2)
    assert sorted(r["bytes_up"] for r in b_records)[-1] == len(blob)  # B saw every byte go to the server


def test_many_flows_share_one_tls_connection(two_gates: dict[str, Any], http_origin: int) -> None:
    a, b, socks = two_gates["a"], two_gates["b"], two_gates["socks"]

    def fetch(i: int) -> bytes:
        return curl("-x", f"socks5h://127.0.0.1:{socks}", f"http://127.0.0.1:{http_origin}/n{i}").stdout

    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(fetch, range(100)))
    assert answers == [f"hello from {http_origin} /n{i}\n".encode() for i in range(100)]
    assert a.stderr().count("mesh: tunnel to b") == 1  # one connection up, never reconnected
    assert b.stderr().count("tunnel from gate a") == 1
    assert len(b.wait_records(100)) == 100


def socks5_reply(port: int, host: str, dport: int) -> int:
    """The reply code a SOCKS5 CONNECT gets (curl folds every SOCKS failure into exit 97)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + dport.to_bytes(2, "big"))
        return s.recv(10)[1]


def test_refusals_reach_the_client_as_its_protocol_says(two_gates: dict[str, Any]) -> None:
    socks = two_gates["socks"]
    assert socks5_reply(socks, "127.0.0.1", 2) == 2  # outside B's allow list for A: "not allowed by ruleset"
    assert socks5_reply(socks, "127.0.0.1", 1) == 2  # allowed, then rejected by B's own route
    assert socks5_reply(socks, "127.0.0.1", 9) == 5  # allowed, nothing listens at B's side: "refused"
    records = two_gates["b"].wait_records(3)
    reasons = sorted((r["close"], r["detail"]) for r in records)
    assert ("rejected", "peer a may not reach 127.0.0.1:2") in reasons, reasons
    assert ("rejected", "rejected by closed") in reasons, reasons
    assert any(close == "upstream error" and "refused" in detail for close, detail in reasons), reasons
    assert two_gates["a"].alive() and two_gates["b"].alive()


def test_an_unknown_gate_is_refused(start_gate: Any, two_gates: dict[str, Any], tmp_path: Path,
                                    http_origin: int) -> None:
    keygen(tmp_path / "stranger")
    socks = free_port()
    stranger = start_gate(
        [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"}],
        routes=[{"via": "b"}],
        mesh={"identity": str(tmp_path / "stranger")},
        peers=[{"name": "b", "address": f"127.0.0.1:{two_gates['h2']}", "id": two_gates["id_b"]}],
    )
    got = curl("-x", f"socks5h://127.0.0.1:{socks}", f"http://127.0.0.1:{http_origin}/")
    assert got.returncode != 0 and got.stdout == b""
    assert "refused" in two_gates["b"].stderr()
    assert "cannot reach b" in stranger.stderr()
    # and a gate that dials the wrong gate (B's address, A's ID pinned) gives up before any stream
    wrong = start_gate(
        [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{(port := free_port())}"}],
        routes=[{"via": "b"}], mesh={"identity": str(tmp_path / "a")},
        peers=[{"name": "b", "address": f"127.0.0.1:{two_gates['h2']}", "id": two_gates["id_a"]}],
    )
    assert curl("-x", f"socks5h://127.0.0.1:{port}", f"http://127.0.0.1:{http_origin}/").returncode != 0
    assert f"expected {two_gates['id_a']}" in wrong.stderr()


def test_restarting_the_far_gate_ends_old_flows_and_new_ones_reconnect(
        start_gate: Any, two_gates: dict[str, Any], http_origin: int, hash_echo: int) -> None:
    a, b, fwd = two_gates["a"], two_gates["b"], two_gates["fwd"]
    assert curl("-x", f"socks5h://127.0.0.1:{two_gates['socks']}", f"http://127.0.0.1:{http_origin}/").stdout
    held = socket.create_connection(("127.0.0.1", fwd), timeout=10)  # a flow open across the restart
    held.sendall(b"x" * 1000)
    time.sleep(0.3)  # through the tunnel and connected at B's side
    b.proc.kill()  # no goodbye: the tunnel just breaks
    b.proc.wait()
    held.settimeout(10)
    with pytest.raises(ConnectionResetError):  # the old flow is reset, never ended as if complete
        held.recv(100)
    held.close()
    b2 = start_gate(b.config["listeners"], routes=b.config["routes"], mesh=b.config["mesh"], peers=b.config["peers"])
    got = curl("-x", f"socks5h://127.0.0.1:{two_gates['socks']}", f"http://127.0.0.1:{http_origin}/again")
    assert got.stdout == f"hello from {http_origin} /again\n".encode()
    assert a.stderr().count("mesh: tunnel to b") == 3  # up, closed, up again
    assert "mesh: tunnel to b closed" in a.stderr()
    assert "reset" in a.wait_records(3)[1]["close"]
    assert b2.alive()


def test_reverse_tunnel_reaches_a_gate_that_only_dials_out(start_gate: Any, tmp_path: Path,
                                                           http_origin: int) -> None:
    """Gate C (behind NAT: no listener at all) keeps a connection to gate B open; a client of B's SOCKS
    listener reaches C's side through it, only where C's allow list for B says, and after B restarts
    C dials again by itself."""
    keygen(tmp_path / "c")
    id_b = keygen(tmp_path / "b")
    h2_port, socks = free_port(), free_port()
    b_setup: dict[str, Any] = dict(
        routes=[{"match": {"port": [http_origin, 2]}, "via": "c", "name": "to-c"}, {"action": "reject"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "c", "cert": str(tmp_path / "c" / "cert.pem")}],  # no address: C connects to us
    )
    b_listeners = [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2_port}"},
                   {"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"}]
    b = start_gate(b_listeners, **b_setup)
    c = start_gate([], mesh={"identity": str(tmp_path / "c")},
                   peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b, "reverse": True,
                           "allow": [{"dst": ["127.0.0.1/32"], "port": [http_origin]}]}],
                   routes=[{"match": {"listener": "b"}, "action": "direct", "name": "from-b"}])
    via_b = ["-x", f"socks5h://127.0.0.1:{socks}"]
    got = curl(*via_b, f"http://127.0.0.1:{http_origin}/far")
    assert got.stdout == f"hello from {http_origin} /far\n".encode(), (got, b.stderr()[-3000:])
    assert socks5_reply(socks, "127.0.0.1", 2) == 2  # C's allow list does not include port 2
    (record,) = [r for r in c.wait_records(2) if r["dst"].endswith(f":{http_origin}")]
    assert (record["listener"], record["rule"], record["path"]) == ("b", "from-b", "h2")
    assert "reverse tunnel from gate c" in b.stderr() and "reverse tunnel to b" in c.stderr()
    b.stop()
    b2 = start_gate(b_listeners, **b_setup)
    deadline = time.monotonic() + 10
    while "reverse tunnel from gate c" not in b2.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    got = curl(*via_b, f"http://127.0.0.1:{http_origin}/again")
    assert got.stdout == f"hello from {http_origin} /again\n".encode()
    assert c.stderr().count(f"reverse tunnel to b (127.0.0.1:{h2_port}) up") == 2  # and up again after B's restart
    assert "reverse tunnel to b closed" in c.stderr()


def test_an_idle_tunnelled_flow_ends_at_the_far_gates_idle_timeout(start_gate: Any, tmp_path: Path,
                                                                   hash_echo: int) -> None:
    id_b = keygen(tmp_path / "b")
    keygen(tmp_path / "a")
    h2_port, fwd = free_port(), free_port()
    b = start_gate([{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2_port}"}],
                   timeouts={"handshake": 5, "connect": 5, "idle": 1, "drain": 1},
                   mesh={"identity": str(tmp_path / "b")},
                   peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "allow": [{"port": [hash_echo]}]}])
    start_gate([{"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{fwd}", "to": f"127.0.0.1:{hash_echo}"}],
               routes=[{"via": "b"}], mesh={"identity": str(tmp_path / "a")},
               peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b}])
    with socket.create_connection(("127.0.0.1", fwd), timeout=10) as s:
        s.sendall(b"hello")
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            s.recv(100)  # nothing more is said: B's idle timeout (1 s) ends the flow, as a reset
        assert 0.8 < time.monotonic() - started < 4
    (record,) = b.wait_records(1)
    assert record["close"] == "idle timeout" and record["bytes_up"] == 5


def test_bad_input_on_the_h2_listener(start_gate: Any, two_gates: dict[str, Any], http_origin: int,
                                      tmp_path: Path) -> None:
    """Garbage, truncated TLS, slow handshakes, TLS without a client certificate, and HTTP/2 garbage from
    a certified peer: each connection is closed, B keeps serving, and no descriptor is left behind."""
    import ssl

    b, port = two_gates["b"], two_gates["h2"]
    via = ["-x", f"socks5h://127.0.0.1:{two_gates['socks']}", f"http://127.0.0.1:{http_origin}/ok"]
    assert curl(*via).returncode == 0  # the tunnel is up: the baseline includes it
    baseline = b.fd_count()

    def read_until_closed(data: bytes) -> None:
        """Returns once B closed the connection; a B that kept it open fails here on the 10 s timeout."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass

    for data in (os.urandom(3000), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40),
                 b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03"):
        read_until_closed(data)
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]  # say nothing at all
    time.sleep(0.3)
    assert curl(*via).returncode == 0  # slow handshakes hold nobody up
    for s in slow:
        s.settimeout(10)
        try:
            assert s.recv(10) == b""  # closed at the handshake timeout (5 s)
        except ConnectionResetError:
            pass
        s.close()
    # a TLS client without a certificate gets no further than the handshake
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    refused = (ssl.SSLError, ConnectionResetError, BrokenPipeError)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(refused), \
            ctx.wrap_socket(raw) as tls:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert tls.recv(100) == b""  # TLS 1.3: the refusal may only show on the first read
        raise ConnectionResetError("closed")
    # a certified peer (A's identity) that sends garbage instead of HTTP/2 is dropped
    ctx.load_cert_chain(tmp_path / "a" / "cert.pem", tmp_path / "a" / "key.pem")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(os.urandom(500))
        try:
            while tls.recv(65536):
                pass
        except (ssl.SSLError, ConnectionResetError):
            pass
    assert b.alive() and curl(*via).returncode == 0
    deadline = time.monotonic() + 5
    while b.fd_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.fd_count() <= baseline


def test_every_sniffed_field_reaches_the_far_gate(start_gate: Any, tmp_path: Path, hash_echo: int) -> None:
    """Routes on the far gate match as they would locally: SNI, ALPN and ECH of Chromium's hello, sniffed on
    gate A, reach gate B (ALPN and ECH were dropped once, so `alpn:` routes never matched there)."""
    keygen(tmp_path / "a")
    id_b = keygen(tmp_path / "b")
    h2_port, fwd = free_port(), free_port()
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2_port}"}],
        routes=[{"match": {"alpn": ["h2"], "sni": ["www.example.test"], "protocol": ["tls"]}, "action": "direct",
                 "name": "h2-by-alpn"},
                {"action": "reject", "name": "other"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "allow": [{"port": [hash_echo]}]}],
    )
    a = start_gate(
        [{"name": "fwd", "kind": "forward", "listen": f"127.0.0.1:{fwd}", "to": f"127.0.0.1:{hash_echo}",
          "sniff": True}],
        routes=[{"via": "b", "name": "to-b"}],
        mesh={"identity": str(tmp_path / "a")},
        peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b}],
    )
    hello = (ROOT / "tests" / "sniff" / "fixtures" / "chromium_tls.bin").read_bytes()
    with socket.create_connection(("127.0.0.1", fwd), timeout=10) as s:
        s.sendall(hello)
        s.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer == f"{hashlib.sha256(hello).hexdigest()} {len(hello)}".encode()  # the server saw it whole
    far = b.wait_records(1)[0]
    assert (far["rule"], far["sni"], far["alpn"], far["ech"], far["protocol"]) == (
        "h2-by-alpn", "www.example.test", ["h2", "http/1.1"], True, "tls"), far
    near = a.wait_records(1)[0]
    assert (near["action"], near["peer"], near["rule"]) == ("via", "b", "to-b"), near  # the log names the peer
