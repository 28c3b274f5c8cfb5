"""UDP flows over WebRTC between two gates on loopback: a SOCKS5 UDP client (PySocks, or Dante's
``socksify`` running ``drill``) -> gate A (socks5, routes via b) -> an unordered data channel without
retransmissions -> gate B -> a UDP echo server or dnsmasq; and back to CONNECT-UDP over HTTP/2 when B
does not offer WebRTC. Both gates log the flow (A: the SOCKS destination, B: the inner flow)."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socks  # PySocks

from tests.conftest import free_port
from tests.e2e.test_mesh import keygen
from tests.e2e.test_socks_udp_clients import _echo, dnsmasq  # noqa: F401  (a fixture)


def udp_gates(start_gate: Any, tmp_path: Path, allowed: list[int], b_transports: list[str],
              b_timeouts: dict[str, float] | None = None) -> dict[str, Any]:
    """B serves h2 (and WebRTC offers when ``b_transports`` lists it), its peer a may reach ``allowed``
    ports on loopback; A's SOCKS listener sends everything via b, WebRTC first."""
    id_b = keygen(tmp_path / "b")
    keygen(tmp_path / "a")
    h2_port, socks_port = free_port(), free_port()
    top: dict[str, Any] = {"timeouts": {"handshake": 5, "connect": 5, "idle": 60, "drain": 2, **(b_timeouts or {})}}
    b = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{h2_port}"}],
        routes=[{"action": "direct", "name": "out"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"), "transports": b_transports,
                "allow": [{"dst": ["127.0.0.1/32"], "port": allowed}]}],
        **top,
    )
    a = start_gate(
        [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks_port}"}],
        routes=[{"via": "b", "name": "to-b"}],
        mesh={"identity": str(tmp_path / "a")},
        peers=[{"name": "b", "address": f"127.0.0.1:{h2_port}", "id": id_b, "transports": ["webrtc", "h2"]}],
    )
    return {"a": a, "b": b, "socks": socks_port}


def pysocks(port: int) -> socks.socksocket:
    s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    s.set_proxy(socks.SOCKS5, "127.0.0.1", port)
    s.settimeout(10)  # the first datagram waits for the peer connection (ICE, DTLS, SCTP)
    s.bind(("127.0.0.1", 0))
    return s


def wait_for(condition: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return result


def by_path(gate: Any, path: str) -> list[dict[str, Any]]:
    return [r for r in gate.records() if r["path"] == path]


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    sock, addr = _echo()
    yield addr
    sock.close()


def test_pysocks_datagrams_cross_an_unordered_channel_byte_exact(start_gate: Any, tmp_path: Path,
                                                                 echo: tuple[str, int]) -> None:
    g = udp_gates(start_gate, tmp_path, [echo[1]], ["webrtc", "h2"])
    a, b = g["a"], g["b"]
    s = pysocks(g["socks"])
    sizes = [1, 1200, 8000, 60000, 0]
    for size in sizes:
        data = os.urandom(size)
        s.sendto(data, echo)
        assert s.recvfrom(65535) == (data, echo)
    s.settimeout(3)
    sent: set[bytes] = set()
    got: set[bytes] = set()
    for _ in range(25):  # 25 windows of 20 datagrams: many datagrams, never more than a window in flight
        window = [os.urandom(1200) for _ in range(20)]
        for data in window:
            s.sendto(data, echo)
        sent.update(window)
        for _ in window:
            data, source = s.recvfrom(65535)
            assert source == echo
            got.add(data)
    assert got == sent  # loopback loses nothing; every answer is one of ours, byte for byte
    s.close()
    (inner,) = wait_for(lambda: by_path(b, "webrtc-udp"))
    total = sum(sizes) + 500 * 1200
    assert inner["dst"] == f"127.0.0.1:{echo[1]}" and inner["listener"] == "mesh" and inner["close"] == "eof"
    assert inner["bytes_up"] == total and inner["bytes_down"] == total
    (outer,) = wait_for(lambda: by_path(a, "udp"))
    assert outer["peer"] == "b" and outer["action"] == "via" and outer["bytes_up"] == total
    assert a.stderr().count("webrtc: connected to b") == 1 and "falls back" not in a.stderr()
    assert not by_path(b, "udp")  # no CONNECT-UDP stream


def test_drill_through_socksify_to_dnsmasq_over_webrtc(start_gate: Any, tmp_path: Path,
                                                        dnsmasq: int) -> None:  # noqa: F811
    if shutil.which("socksify") is None or shutil.which("drill") is None:
        pytest.skip("socksify (Debian dante-client) or drill (Debian ldnsutils) is not installed")
    g = udp_gates(start_gate, tmp_path, [dnsmasq], ["webrtc", "h2"])
    conf = tmp_path / "socks.conf"
    conf.write_text(f"""route {{
  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {g["socks"]}
  proxyprotocol: socks_v5
  command: udpassociate connect
  method: none
}}
""")
    env = {**os.environ, "SOCKS_CONF": str(conf), "SOCKS_AUTOADD_LANROUTES": "no"}
    got = subprocess.run(["socksify", "drill", "-p", str(dnsmasq), "@127.0.0.1", "example.test"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert got.returncode == 0, got.stderr
    assert "192.0.2.7" in got.stdout
    (inner,) = wait_for(lambda: by_path(g["b"], "webrtc-udp"))
    assert (inner["protocol"], inner["dst"], inner["host"]) == ("dns", f"127.0.0.1:{dnsmasq}", "example.test")
    assert inner["bytes_up"] > 0 and inner["bytes_down"] > 0
    (outer,) = wait_for(lambda: by_path(g["a"], "udp"))
    assert outer["protocol"] == "dns" and outer["peer"] == "b"


def test_b_refuses_a_destination_outside_its_allow_list(start_gate: Any, tmp_path: Path,
                                                        echo: tuple[str, int]) -> None:
    g = udp_gates(start_gate, tmp_path, [echo[1]], ["webrtc", "h2"])
    a, b = g["a"], g["b"]
    s = pysocks(g["socks"])
    s.sendto(b"allowed", echo)
    assert s.recvfrom(100) == (b"allowed", echo)
    closed = ("127.0.0.1", echo[1] + 1)
    s.sendto(b"not allowed", closed)
    refused = wait_for(lambda: [r for r in by_path(a, "udp") if r["dst"] == "{}:{}".format(*closed)])
    assert refused[0]["close"] == "rejected" and "403" in refused[0]["detail"], refused
    (inner,) = wait_for(lambda: [r for r in by_path(b, "webrtc-udp") if r["close"] == "rejected"])
    assert inner["dst"] == "{}:{}".format(*closed) and "peer a may not reach" in inner["detail"]
    s.sendto(b"still served", echo)  # the association, and its other destination, live on
    assert s.recvfrom(100) == (b"still served", echo)
    s.close()
    assert "falls back" not in a.stderr()


def test_a_peer_that_does_not_offer_webrtc_gets_udp_over_connect_udp(start_gate: Any, tmp_path: Path,
                                                                     echo: tuple[str, int]) -> None:
    g = udp_gates(start_gate, tmp_path, [echo[1]], ["h2"])
    s = pysocks(g["socks"])
    for i in range(3):
        s.sendto(b"over h2 %d" % i, echo)
        assert s.recvfrom(100) == (b"over h2 %d" % i, echo)
    s.close()
    (inner,) = wait_for(lambda: by_path(g["b"], "udp"))
    assert inner["bytes_up"] == 3 * 9 and not by_path(g["b"], "webrtc-udp")
    assert g["a"].stderr().count("falls back to h2") == 1


def test_a_quiet_channel_ends_at_b_and_the_next_datagram_opens_another(start_gate: Any, tmp_path: Path,
                                                                      echo: tuple[str, int]) -> None:
    g = udp_gates(start_gate, tmp_path, [echo[1]], ["webrtc", "h2"], {"idle": 1})
    s = pysocks(g["socks"])
    s.sendto(b"one", echo)
    assert s.recvfrom(100) == (b"one", echo)
    first = wait_for(lambda: by_path(g["b"], "webrtc-udp"), timeout=6)  # B's idle timeout closed the channel
    assert first[0]["close"] == "idle timeout" and first[0]["bytes_up"] == 3 and first[0]["bytes_down"] == 3
    time.sleep(0.3)  # A hears of the close
    s.sendto(b"two", echo)
    assert s.recvfrom(100) == (b"two", echo)
    s.close()
    records = wait_for(lambda: len(by_path(g["b"], "webrtc-udp")) == 2 and by_path(g["b"], "webrtc-udp"))
    assert records[1]["bytes_up"] == 3
    assert g["a"].stderr().count("webrtc: connected to b") == 1


def test_descriptors_return_to_baseline(start_gate: Any, tmp_path: Path, echo: tuple[str, int]) -> None:
    g = udp_gates(start_gate, tmp_path, [echo[1]], ["webrtc", "h2"])
    a, b = g["a"], g["b"]
    s = pysocks(g["socks"])
    s.sendto(b"up", echo)  # the peer connection comes up (its sockets stay)
    assert s.recvfrom(100) == (b"up", echo)
    s.close()
    wait_for(lambda: by_path(b, "webrtc-udp"))
    time.sleep(0.5)
    gc.collect()
    baseline = a.fd_count(), b.fd_count()
    for round_ in range(10):
        s = pysocks(g["socks"])
        s.settimeout(5)
        s.sendto(b"round %d" % round_, echo)
        assert s.recvfrom(100) == (b"round %d" % round_, echo)
        s.close()
    wait_for(lambda: len(by_path(b, "webrtc-udp")) == 11)
    deadline = time.monotonic() + 5
    while (a.fd_count(), b.fd_count()) != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (a.fd_count(), b.fd_count()) == baseline
    assert a.stderr().count("webrtc: connected to b") == 1
    assert a.stop() == 0 and b.stop() == 0
    assert "Task was destroyed" not in a.stderr() + b.stderr() and "Traceback" not in a.stderr() + b.stderr()


def test_udp_falls_back_to_connect_udp_when_the_webrtc_link_is_dead(start_gate: Any, tmp_path: Path,
                                                                   echo: tuple[str, int]) -> None:
    """B dies without a word (SIGKILL) and comes back: A's peer connection does not know; the next UDP
    session's channel is not acknowledged, so it goes as CONNECT-UDP, and the one after over WebRTC again."""
    g = udp_gates(start_gate, tmp_path, [echo[1]], ["webrtc", "h2"])
    a, b = g["a"], g["b"]
    s = pysocks(g["socks"])
    s.sendto(b"before", echo)
    assert s.recvfrom(100) == (b"before", echo)
    s.close()
    b.proc.kill()
    b.proc.wait()
    config = b.config
    b2 = start_gate(config["listeners"], routes=config["routes"], mesh=config["mesh"], peers=config["peers"],
                    timeouts=config["timeouts"])
    for count, word in enumerate((b"fallback", b"again"), 1):
        s = pysocks(g["socks"])
        s.settimeout(15)  # the dead channel's 3 s, then the HTTP/2 tunnel dialled again
        s.sendto(word, echo)
        assert s.recvfrom(100) == (word, echo)
        s.close()
        wait_for(lambda n=count: len(b2.records()) == n)  # type: ignore[misc]
    assert [r["path"] for r in b2.records()] == ["udp", "webrtc-udp"]
    assert "the connection does not answer" in a.stderr()
