"""No self-loops, and destination rules that hold for what is dialled: a flow whose destination is one of
the gate's own listeners is refused in every spelling the resolver takes (127.1, 2130706433, 0x7f000001,
::ffff:127.0.0.1, 0.0.0.0, a name resolving to one), and a route rejecting 127.0.0.0/8 also stops names
and numeric forms that are 127.x. Once, one SOCKS write with 500 nested handshakes opened 1,000
descriptors, and one ClientHello with SNI localhost to an sni listener on its own port opened 8,205."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from typing import Any

import pytest

from tests.conftest import free_port

SPELLINGS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "localhost", "0.0.0.0", "0"]


def socks5_connect(port: int, host: str, dport: int) -> int:
    """The reply code of a SOCKS5 CONNECT to ``host`` (an IPv6 literal as ATYP 4, anything else as a
    domain, so the gate sees the client's own spelling)."""
    if ":" in host:
        target = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    else:
        target = b"\x03" + bytes([len(host)]) + host.encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00" + target + struct.pack("!H", dport))
        return s.recv(10)[1]


def settle(gate: Any, baseline: int) -> int:
    deadline = time.monotonic() + 5
    while gate.fd_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return gate.fd_count()


@pytest.mark.parametrize("host", [*SPELLINGS, "::ffff:127.0.0.1"])
def test_a_socks_flow_to_the_gate_itself_is_refused(start_gate: Any, host: str) -> None:
    port = free_port()
    gate = start_gate([{"name": "socks", "kind": "socks5", "listen": f"0.0.0.0:{port}"}])
    baseline = gate.fd_count()
    assert socks5_connect(port, host, port) == 2  # "not allowed by ruleset", not a flow into ourselves
    record = gate.wait_records(1)[0]
    assert (record["close"], record["action"]) == ("refused", "direct"), record
    assert settle(gate, baseline) <= baseline


def test_nested_socks_handshakes_open_nothing(start_gate: Any) -> None:
    port = free_port()
    gate = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{port}"}])
    baseline = gate.fd_count()
    hop = b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(hop * 500)
        s.settimeout(5)
        answer = b""
        while len(answer) < 12 and (chunk := s.recv(100)):
            answer += chunk
        assert answer[:2] == b"\x05\x00" and answer[3] == 2  # the first hop is refused; nothing is nested
        peak = gate.fd_count()
    assert peak <= baseline + 2, (peak, baseline)
    assert settle(gate, baseline) <= baseline
    assert len(gate.wait_records(1)) == 1


def test_an_sni_listener_does_not_dial_itself_by_name(start_gate: Any) -> None:
    port = free_port()
    gate = start_gate([{"name": "sni", "kind": "sni", "listen": f"127.0.0.1:{port}", "port": port}])
    baseline = gate.fd_count()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(raw, server_hostname="localhost")
    peak = gate.fd_count()
    assert peak <= baseline + 2, (peak, baseline)
    records = gate.wait_records(1)
    assert len(records) == 1 and records[0]["close"] == "refused" and "loop" in records[0]["detail"], records
    assert settle(gate, baseline) <= baseline


@pytest.mark.parametrize("host", ["localhost", "127.1", "2130706433", "0x7f000001", "127.0.0.1"])
def test_a_dst_reject_rule_holds_for_names_and_numeric_forms(start_gate: Any, hash_echo: int, host: str) -> None:
    port = free_port()
    gate = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{port}"}], routes=[
        {"name": "no-lan", "match": {"dst": ["127.0.0.0/8", "0.0.0.0/8", "::1/128"]}, "action": "reject"},
        {"name": "out", "action": "direct"}])
    assert socks5_connect(port, host, hash_echo) == 2
    record = gate.wait_records(1)[0]
    assert record["close"] == "rejected" and "no-lan" in record["detail"], record


def test_names_still_reach_what_the_rules_allow(start_gate: Any, hash_echo: int) -> None:
    port = free_port()
    gate = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{port}"}], routes=[
        {"name": "no-ten", "match": {"dst": ["10.0.0.0/8"]}, "action": "reject"},
        {"name": "out", "action": "direct"}])
    assert socks5_connect(port, "localhost", hash_echo) == 0
    assert gate.alive()
