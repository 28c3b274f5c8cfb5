"""SOCKS5 UDP ASSOCIATE end to end: PySocks (a real UDP client) against local UDP echo servers, byte-exact,
IPv4 and IPv6; routes per destination (reject, QUIC by SNI); the bounds; datagrams from foreign
addresses, fragments and garbage dropped and counted; the association's life tied to its control
connection. Raw clients where PySocks cannot misbehave on purpose."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socks  # PySocks

from tests.conftest import free_port
from tests.sniff.test_quic import datagrams  # the fixtures' length-prefixed datagrams

FIXTURES = Path(__file__).parent.parent / "sniff" / "fixtures"


class Echo:
    """A UDP echo server (answers each datagram to its sender), on its own thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.addr = self.sock.getsockname()[:2]
        self.seen = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            self.seen += 1
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


def start(start_gate: Any, udp: dict[str, Any] | None = None, routes: list[dict[str, Any]] | None = None,
          host: str = "127.0.0.1", kind: str = "socks5", **extra: Any) -> Any:
    port = free_port(host)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    spec: dict[str, Any] = {"name": "socks", "kind": kind, "listen": listen, **extra}
    if udp is not None:
        spec["udp"] = udp
    gate = start_gate([spec], routes=routes, timeouts={"handshake": 2, "connect": 2, "idle": 30, "drain": 1})
    gate.addr = (host, port)
    return gate


def pysocks(gate: Any, family: int = socket.AF_INET, **auth: str) -> socks.socksocket:
    s = socks.socksocket(family, socket.SOCK_DGRAM)
    s.set_proxy(socks.SOCKS5, gate.addr[0], gate.addr[1], **auth)
    s.settimeout(3)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    return s


def associate(gate: Any, port: int = 0,
              users: tuple[str, str] | None = None) -> tuple[socket.socket, tuple[str, int], int]:
    """A raw UDP ASSOCIATE naming ``port`` as the client's: (control socket, relay address, reply code)."""
    c = socket.create_connection(gate.addr, timeout=5)
    c.sendall(b"\x05\x01" + (b"\x02" if users else b"\x00"))
    assert c.recv(2) == b"\x05" + (b"\x02" if users else b"\x00")
    if users:
        u, p = users[0].encode(), users[1].encode()
        c.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        assert c.recv(2) == b"\x01\x00"
    c.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00" + struct.pack("!H", port))
    reply = c.recv(4)
    if len(reply) < 4 or reply[1] != 0:
        return c, ("", 0), reply[1] if len(reply) > 1 else -1
    raw = c.recv(4 + 2 if reply[3] == 1 else 16 + 2)
    family = socket.AF_INET if reply[3] == 1 else socket.AF_INET6
    return c, (socket.inet_ntop(family, raw[:-2]), struct.unpack("!H", raw[-2:])[0]), 0


def wrap(host: str, port: int, data: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    atyp = b"\x04" if family == socket.AF_INET6 else b"\x01"
    return b"\x00\x00\x00" + atyp + socket.inet_pton(family, host) + struct.pack("!H", port) + data


def udp_client(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(3)
    return s


def wait_for(what: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := what()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def by_path(gate: Any, path: str) -> list[dict[str, Any]]:
    return [r for r in gate.records() if r["path"] == path]


def dropped(record: dict[str, Any]) -> dict[str, int]:
    """The control record's counters: "...; dropped foreign=2 malformed=1" -> {"foreign": 2, ...}."""
    for part in (record["detail"] or "").split("; "):
        if part.startswith("dropped "):
            return {k: int(v) for k, v in (item.split("=") for item in part[8:].split())}
    return {}


# -- byte-exact relaying with PySocks -------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 1200, 8000, 65000])
def test_pysocks_echo_byte_exact(start_gate: Any, echo: Echo, size: int) -> None:
    gate = start(start_gate)
    s = pysocks(gate)
    payloads = [os.urandom(size) for _ in range(5)]
    for data in payloads:
        s.sendto(data, echo.addr)
        got, frm = s.recvfrom(65535)
        assert got == data and frm == echo.addr
    s.close()
    (flow,) = wait_for(lambda: by_path(gate, "udp"))
    assert flow["dst"] == "{}:{}".format(*echo.addr) and flow["action"] == "direct"
    assert flow["bytes_up"] == flow["bytes_down"] == 5 * size
    (control,) = by_path(gate, "udp-associate")
    assert control["close"] == "eof" and control["detail"] == "udp destinations=1"


def test_ipv6_destination_from_pysocks(start_gate: Any) -> None:
    """PySocks 1.7.1 cannot bind an IPv6 UDP socket (its bind() unpacks a 4-tuple as 2): an IPv4 client
    to an IPv6 destination (ATYP 4 in the header) here, a raw IPv6 client below."""
    echo6 = Echo("::1")
    gate = start(start_gate)
    s = pysocks(gate)
    s.sendto(b"six", echo6.addr)
    got, frm = s.recvfrom(100)
    assert got == b"six" and frm[:2] == echo6.addr
    s.close()
    echo6.close()
    (flow,) = wait_for(lambda: by_path(gate, "udp"))
    assert flow["dst"] == f"[::1]:{echo6.addr[1]}"


def test_ipv6_listener_and_relay(start_gate: Any) -> None:
    echo6 = Echo("::1")
    gate = start(start_gate, host="::1")
    client = udp_client("::1")
    c, relay, code = associate(gate, client.getsockname()[1])
    assert code == 0 and relay[0] == "::1"
    for _ in range(3):
        data = os.urandom(1200)
        client.sendto(wrap(*echo6.addr, data), relay)
        assert client.recv(2000) == wrap(*echo6.addr, data)
    c.close()
    client.close()
    echo6.close()
    (flow,) = wait_for(lambda: by_path(gate, "udp"))
    assert flow["dst"] == f"[::1]:{echo6.addr[1]}" and flow["bytes_up"] == flow["bytes_down"] == 3 * 1200


def test_a_name_is_resolved_by_the_gate(start_gate: Any, echo: Echo) -> None:
    gate = start(start_gate)
    s = pysocks(gate)  # rdns (PySocks' default): the name travels in the header
    for i in range(3):  # the first opens the destination, the others take the path of open ones
        s.sendto(b"by name %d" % i, ("localhost", echo.addr[1]))
        got, frm = s.recvfrom(100)
        assert got == b"by name %d" % i and frm == ("127.0.0.1", echo.addr[1])  # the remote's address, as Dante
    s.close()
    (flow,) = wait_for(lambda: by_path(gate, "udp"))
    assert flow["host"] == "localhost" and flow["dst"] == f"127.0.0.1:{echo.addr[1]}"
    assert flow["bytes_up"] == flow["bytes_down"] == 3 * 9


def test_many_destinations_one_flow_each(start_gate: Any) -> None:
    echoes = [Echo() for _ in range(3)]
    gate = start(start_gate)
    s = pysocks(gate)
    for round_ in range(3):
        for e in echoes:
            s.sendto(b"%d" % round_, e.addr)
            got, frm = s.recvfrom(100)
            assert got == b"%d" % round_ and frm == e.addr
    s.close()
    flows = wait_for(lambda: len(by_path(gate, "udp")) == 3 and by_path(gate, "udp"))
    assert sorted(f["dst"] for f in flows) == sorted("{}:{}".format(*e.addr) for e in echoes)
    for e in echoes:
        e.close()


def test_mux_listener_serves_udp_associate(start_gate: Any, echo: Echo) -> None:
    gate = start(start_gate, kind="mux")
    s = pysocks(gate)
    s.sendto(b"via mux", echo.addr)
    assert s.recvfrom(100)[0] == b"via mux"
    s.close()
    assert wait_for(lambda: by_path(gate, "udp"))


def test_auth_applies(start_gate: Any, echo: Echo) -> None:
    gate = start(start_gate, users={"alice": "s3cret"})
    s = pysocks(gate, username="alice", password="s3cret")
    s.sendto(b"authed", echo.addr)
    assert s.recvfrom(100)[0] == b"authed"
    s.close()
    with pytest.raises(socks.ProxyError):  # the association is asked for when PySocks binds
        pysocks(gate)
    with pytest.raises(socks.ProxyError):
        pysocks(gate, username="alice", password="nope")
    assert len(wait_for(lambda: len(by_path(gate, "udp-associate")) == 1 and by_path(gate, "udp-associate"))) == 1


def test_disabled_is_command_not_supported(start_gate: Any) -> None:
    gate = start(start_gate, udp={"enabled": False})
    c, _, code = associate(gate)
    assert code == 7
    c.close()


# -- routes per destination -----------------------------------------------------------------------


def test_reject_route_per_destination(start_gate: Any) -> None:
    allowed, blocked = Echo("127.0.0.1"), Echo("127.0.0.2")
    gate = start(start_gate, routes=[{"name": "no-2", "match": {"dst": "127.0.0.2/32"}, "action": "reject"},
                                     {"action": "direct"}])
    s = pysocks(gate)
    s.sendto(b"blocked", blocked.addr)
    s.sendto(b"allowed", allowed.addr)
    assert s.recvfrom(100) == (b"allowed", allowed.addr)
    s.settimeout(0.5)
    with pytest.raises(socket.timeout):
        s.recvfrom(100)
    s.close()
    assert blocked.seen == 0
    flows = wait_for(lambda: len(by_path(gate, "udp")) >= 2 and by_path(gate, "udp"))
    rejected = [f for f in flows if f["close"] == "rejected"]
    assert rejected and rejected[0]["rule"] == "no-2" and rejected[0]["dst"] == f"127.0.0.2:{blocked.addr[1]}"
    allowed.close()
    blocked.close()


@pytest.mark.parametrize("sni", ["www.example.test", "other.example.test"])
def test_quic_initial_routed_by_sni(start_gate: Any, echo: Echo, sni: str) -> None:
    """Chromium's first flight (its ClientHello spans three Initials) is held until the name is known;
    the route on the name then rejects it, or relays all three datagrams."""
    gate = start(start_gate, routes=[{"name": "no-www", "match": {"sni": sni}, "action": "reject"},
                                     {"action": "direct"}])
    s = pysocks(gate)
    flight = datagrams("chromium_quic_initial.bin")
    for datagram in flight:
        s.sendto(datagram, echo.addr)
    if sni == "www.example.test":
        s.settimeout(1)
        with pytest.raises(socket.timeout):
            s.recvfrom(2000)
        (flow,) = wait_for(lambda: by_path(gate, "udp"))
        assert (flow["close"], flow["rule"], flow["sni"], flow["protocol"]) == ("rejected", "no-www",
                                                                              "www.example.test", "quic")
        assert echo.seen == 0
    else:
        assert [s.recvfrom(2000)[0] for _ in flight] == flight
        s.close()
        (flow,) = wait_for(lambda: by_path(gate, "udp"))
        assert (flow["action"], flow["sni"], flow["protocol"]) == ("direct", "www.example.test", "quic")
    s.close()


def test_dns_is_sniffed(start_gate: Any, echo: Echo) -> None:
    gate = start(start_gate)
    s = pysocks(gate)
    query = (FIXTURES / "dig_query.bin").read_bytes()
    s.sendto(query, echo.addr)
    assert s.recvfrom(2000)[0] == query
    s.close()
    (flow,) = wait_for(lambda: by_path(gate, "udp"))
    assert flow["protocol"] == "dns"


# -- what a client must not do ---------------------------------------------------------------------


def test_foreign_fragments_and_garbage_are_dropped_and_counted(start_gate: Any, echo: Echo) -> None:
    gate = start(start_gate)
    client = udp_client()
    c, relay, code = associate(gate, client.getsockname()[1])
    assert code == 0
    stranger = udp_client()
    stranger.sendto(wrap(*echo.addr, b"from a stranger"), relay)  # right header, wrong source port
    client.sendto(b"\x00\x00\x01" + wrap(*echo.addr, b"frag")[3:], relay)  # FRAG = 1
    for garbage in (b"", b"\x00", b"\x00\x00\x00\x01\x7f", b"\xff" * 40, b"\x05\x01\x00",
                    b"\x00\x00\x00\x03\x05ab", b"\x00\x00\x00\x09" + bytes(10)):
        client.sendto(garbage, relay)
    client.sendto(wrap(*echo.addr, b"still serving"), relay)
    got = client.recv(100)
    assert got == wrap(*echo.addr, b"still serving")
    # the open destination's header cut short: the bytes of the datagram before must not complete it
    for cut in range(4, 10):
        client.sendto(wrap(*echo.addr, b"")[:cut], relay)
    client.sendto(wrap(*echo.addr, b"and still"), relay)
    assert client.recv(100) == wrap(*echo.addr, b"and still")
    assert echo.seen == 2
    c.close()
    control = wait_for(lambda: by_path(gate, "udp-associate"))[0]
    assert dropped(control) == {"foreign": 1, "fragment": 1, "malformed": 7 + 6}
    assert gate.alive() and "Traceback" not in gate.stderr()
    client.close()
    stranger.close()


def test_port_learnt_from_the_first_datagram(start_gate: Any, echo: Echo) -> None:
    gate = start(start_gate)
    c, relay, _ = associate(gate, 0)  # the client did not say which port it sends from
    first, second = udp_client(), udp_client()
    first.sendto(wrap(*echo.addr, b"one"), relay)
    assert first.recv(100).endswith(b"one")
    second.sendto(wrap(*echo.addr, b"two"), relay)  # same address, another port: not the client
    first.sendto(wrap(*echo.addr, b"three"), relay)  # behind it in the relay's queue: once answered,
    assert first.recv(100).endswith(b"three")  # the stranger's datagram was handled
    c.close()
    control = wait_for(lambda: by_path(gate, "udp-associate"))[0]
    assert dropped(control) == {"foreign": 1}
    first.close()
    second.close()


@pytest.mark.parametrize("garbage", [b"\x00" * 10, b"GET / HTTP/1.1\r\n\r\n", b"\xff" * 3000],
                         ids=["nul", "http", "long"])
def test_garbage_on_the_control_connection_ends_the_association(start_gate: Any, echo: Echo, garbage: bytes) -> None:
    gate = start(start_gate)
    client = udp_client()
    c, relay, _ = associate(gate, client.getsockname()[1])
    client.sendto(wrap(*echo.addr, b"x"), relay)
    assert client.recv(100).endswith(b"x")
    c.sendall(garbage)
    try:
        assert c.recv(10) == b""  # closed (with a reset when the gate left bytes unread)
    except ConnectionResetError:
        pass
    flow = wait_for(lambda: by_path(gate, "udp"))[0]
    assert flow["close"] == "client error"
    control = wait_for(lambda: by_path(gate, "udp-associate"))[0]
    assert control["close"] == "client error"
    client.sendto(wrap(*echo.addr, b"gone"), relay)  # the relay socket is closed with it
    client.settimeout(0.5)
    with pytest.raises((socket.timeout, ConnectionRefusedError)):
        client.recv(100)
    assert gate.alive() and "Traceback" not in gate.stderr()
    client.close()
    c.close()


def test_association_lives_as_long_as_its_control_connection(start_gate: Any) -> None:
    echoes = [Echo() for _ in range(4)]
    gate = start(start_gate)
    c0, _, _ = associate(gate)  # a first association opens whatever the gate opens once (resolver, ...)
    c0.close()
    wait_for(lambda: by_path(gate, "udp-associate"))
    time.sleep(0.2)
    baseline = gate.fd_count()
    clients = []
    for _ in range(3):
        client = udp_client()
        c, relay, _ = associate(gate, client.getsockname()[1])
        for e in echoes:
            client.sendto(wrap(*e.addr, b"ping"), relay)
        for _ in echoes:
            client.recv(100)
        clients.append((c, client))
    assert gate.fd_count() >= baseline + 3 * (1 + 1 + 4)  # control, relay, one upstream per destination
    for i, (c, client) in enumerate(clients):
        if i == 0:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
        c.close()
        client.close()
    assert wait_for(lambda: len(by_path(gate, "udp")) == 12)
    assert wait_for(lambda: gate.fd_count() <= baseline), (gate.fd_count(), baseline)
    closes = sorted(r["close"] for r in by_path(gate, "udp-associate"))
    assert closes == ["client reset", "eof", "eof", "eof"]
    for e in echoes:
        e.close()


# -- bounds ---------------------------------------------------------------------------------------


def test_max_destinations_per_association(start_gate: Any) -> None:
    echoes = [Echo() for _ in range(3)]
    gate = start(start_gate, udp={"max_destinations": 2})
    client = udp_client()
    c, relay, _ = associate(gate, client.getsockname()[1])
    for e in echoes[:2]:
        client.sendto(wrap(*e.addr, b"in"), relay)
        client.recv(100)
    client.sendto(wrap(*echoes[2].addr, b"one too many"), relay)
    client.sendto(wrap(*echoes[0].addr, b"known"), relay)  # open destinations still work
    assert client.recv(100).endswith(b"known")
    assert echoes[2].seen == 0
    c.close()
    control = wait_for(lambda: by_path(gate, "udp-associate"))[0]
    assert dropped(control) == {"max_destinations": 1} and "destinations=2" in control["detail"]
    for e in echoes:
        e.close()
    client.close()


def test_max_associations_per_client(start_gate: Any) -> None:
    gate = start(start_gate, udp={"max_associations_per_client": 2})
    held = [associate(gate) for _ in range(2)]
    assert all(code == 0 for _, _, code in held)
    c, _, code = associate(gate)
    assert code == 2  # not allowed
    c.close()
    held[0][0].close()
    time.sleep(0.2)
    c, _, code = associate(gate)  # room again
    assert code == 0
    for conn in (c, held[1][0]):
        conn.close()


def test_a_granted_association_is_not_a_pending_handshake(start_gate: Any) -> None:
    """Associations, once granted, leave max_handshakes_per_source: a client may hold more of them than
    it may hold unfinished handshakes."""
    gate = start(start_gate, max_handshakes_per_source=2)
    held = [associate(gate) for _ in range(4)]
    assert [code for _, _, code in held] == [0] * 4
    for c, _, _ in held:
        c.close()


def test_max_datagram(start_gate: Any, echo: Echo) -> None:
    gate = start(start_gate, udp={"max_datagram": 1000})
    client = udp_client()
    c, relay, _ = associate(gate, client.getsockname()[1])
    client.sendto(wrap(*echo.addr, b"x" * 1001), relay)
    client.sendto(wrap(*echo.addr, b"x" * 1000), relay)
    assert len(client.recv(2000)) == 10 + 1000
    assert echo.seen == 1
    c.close()
    control = wait_for(lambda: by_path(gate, "udp-associate"))[0]
    assert dropped(control) == {"too_big": 1}
    client.close()


def test_idle_destination_expires_while_the_association_lives(start_gate: Any, echo: Echo) -> None:
    gate = start(start_gate, udp={"session_timeout": 0.5})
    client = udp_client()
    c, relay, _ = associate(gate, client.getsockname()[1])
    client.sendto(wrap(*echo.addr, b"a"), relay)
    client.recv(100)
    (flow,) = wait_for(lambda: by_path(gate, "udp"), timeout=5)
    assert flow["close"] == "idle timeout"
    client.sendto(wrap(*echo.addr, b"b"), relay)  # a new flow for the same destination
    assert client.recv(100).endswith(b"b")
    c.close()
    assert wait_for(lambda: len(by_path(gate, "udp")) == 2)
    client.close()


# -- the shared opener's policy, per destination --------------------------------------------------


def test_fixed_upstream_answers_as_the_destination(start_gate: Any, echo: Echo) -> None:
    gate = start(start_gate, routes=[{"match": {"dst": "192.0.2.0/24"}, "upstream": "{}:{}".format(*echo.addr)},
                                     {"action": "direct"}])
    s = pysocks(gate)
    s.sendto(b"to a test-net address", ("192.0.2.1", 9))
    assert s.recvfrom(100) == (b"to a test-net address", ("192.0.2.1", 9))  # never hears of the upstream
    s.close()
    (flow,) = wait_for(lambda: by_path(gate, "udp"))
    assert flow["dst"] == "192.0.2.1:9" and flow["upstream"] == "{}:{}".format(*echo.addr)


def test_a_destination_routed_via_a_peer_crosses_the_mesh(start_gate: Any, echo: Echo, tmp_path: Path) -> None:
    """A destination routed via a peer goes as a CONNECT-UDP stream; gate B dials it and logs the inner
    flow; answers come back wrapped with the destination's address. One B's allow list refuses is
    ended with the refusal, and never relayed direct."""
    from tests.e2e.test_mesh import keygen

    keygen(tmp_path / "a")
    keygen(tmp_path / "b")
    b_port = free_port()
    b = start_gate([{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{b_port}"}],
                   routes=[{"action": "direct"}], mesh={"identity": str(tmp_path / "b")},
                   peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"),
                           "allow": [{"dst": ["127.0.0.1/32"], "port": [echo.addr[1]]}]}])
    port = free_port()
    gate = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{port}"}],
                      routes=[{"via": "b", "name": "to-b"}], mesh={"identity": str(tmp_path / "a")},
                      peers=[{"name": "b", "address": f"127.0.0.1:{b_port}", "cert": str(tmp_path / "b" / "cert.pem")}])
    gate.addr = ("127.0.0.1", port)
    s = pysocks(gate)
    for i in range(5):
        s.sendto(b"over the mesh %d" % i, echo.addr)
        data, source = s.recvfrom(2048)
        assert data == b"over the mesh %d" % i and source == echo.addr
    s.sendto(b"not allowed", ("127.0.0.1", echo.addr[1] + 1))  # B's allow list names the echo port only
    refused = wait_for(lambda: [r for r in by_path(gate, "udp") if r["dst"].endswith(f":{echo.addr[1] + 1}")])
    assert refused and refused[0]["close"] == "rejected", refused  # ended at once, the association lives on
    s.sendto(b"still served", echo.addr)
    assert s.recvfrom(2048)[0] == b"still served"
    s.close()
    (inner,) = wait_for(lambda: [r for r in by_path(b, "udp") if r["close"] != "rejected"])
    assert inner["dst"] == f"127.0.0.1:{echo.addr[1]}" and inner["bytes_up"] == 5 * 15 + len(b"still served")
    flows = wait_for(lambda: len(by_path(gate, "udp")) == 2 and by_path(gate, "udp"))
    by_dst = {r["dst"]: r for r in flows}
    assert by_dst[f"127.0.0.1:{echo.addr[1]}"]["peer"] == "b"
    assert by_dst[f"127.0.0.1:{echo.addr[1] + 1}"]["close"] == "rejected"
    assert echo.seen == 6


def test_loop_guard_and_names_vetted_like_tcp(start_gate: Any) -> None:
    """A destination that is the gate itself is refused; a name is resolved by the gate and each of its
    addresses routed again, so a rule on 127.0.0.0/8 also stops "localhost"."""
    gate = start(start_gate, routes=[{"name": "no-loopback-2", "match": {"dst": "127.0.0.2/32"}, "action": "reject"},
                                     {"name": "no-lo", "match": {"dst": ["127.0.0.0/8", "::1/128"], "port": 9},
                                      "action": "reject"},
                                     {"action": "direct"}])
    s = pysocks(gate)
    s.sendto(b"loop", gate.addr)  # the SOCKS listener's own address
    s.sendto(b"by name", ("localhost", 9))
    flows = wait_for(lambda: len(by_path(gate, "udp")) == 2 and by_path(gate, "udp"))  # before the
    s.close()  # association ends (a destination still opening would end with it)
    loop = next(f for f in flows if f["dst"] == "{}:{}".format(*gate.addr))
    named = next(f for f in flows if f["host"] == "localhost")
    assert loop["close"] == "refused" and "loop" in loop["detail"]
    assert named["close"] == "rejected" and "no-lo (localhost is " in named["detail"]
    assert gate.alive()


def test_max_sessions_of_the_listener(start_gate: Any) -> None:
    echoes = [Echo() for _ in range(3)]
    gate = start(start_gate, udp={"max_sessions": 2})
    clients = [udp_client(), udp_client()]
    controls = []
    for client, e in zip(clients, echoes[:2], strict=True):
        c, relay, _ = associate(gate, client.getsockname()[1])
        controls.append(c)
        client.sendto(wrap(*e.addr, b"in"), relay)
        assert client.recv(100).endswith(b"in")
    client.sendto(wrap(*echoes[2].addr, b"a third socket"), relay)
    (refused,) = wait_for(lambda: by_path(gate, "udp"))
    assert refused["close"] == "refused" and "max_sessions (2)" in refused["detail"]
    assert echoes[2].seen == 0
    for c in controls:
        c.close()
    for s in (*clients, *(e.sock for e in echoes)):
        s.close()


def test_an_association_without_datagrams_ends_at_the_idle_timeout(start_gate: Any, echo: Echo) -> None:
    port = free_port()
    gate = start_gate([{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{port}",
                        "timeouts": {"idle": 1}}])
    gate.addr = ("127.0.0.1", port)
    client = udp_client()
    c, relay, _ = associate(gate, client.getsockname()[1])
    client.sendto(wrap(*echo.addr, b"once"), relay)
    client.recv(100)
    (control,) = wait_for(lambda: by_path(gate, "udp-associate"), timeout=5)
    assert control["close"] == "idle timeout"
    assert c.recv(10) == b""  # the control connection is closed with it
    assert by_path(gate, "udp")[0]["close"] == "idle timeout"
    c.close()
    client.close()


def test_fuzzed_datagrams_and_handshakes(start_gate: Any, echo: Echo) -> None:
    """Mutated real datagrams (DNS, QUIC, to addresses and names) on the relay socket and mutated UDP
    ASSOCIATE requests on the control connection: the gate keeps serving, logs no traceback, and its
    descriptors return to baseline once the associations end."""
    import random

    from tests.e2e.test_fuzz import CASES, SEED, mutate

    rng = random.Random(SEED)
    gate = start(start_gate)
    c0, _, _ = associate(gate)
    c0.close()
    wait_for(lambda: by_path(gate, "udp-associate"))
    time.sleep(0.2)
    baseline = gate.fd_count()
    payloads = [(FIXTURES / "dig_query.bin").read_bytes(), *datagrams("chromium_quic_initial.bin")[:2]]
    seeds = [wrap(*echo.addr, p) for p in payloads] + [b"\x00\x00\x00\x03\x09localhost" + struct.pack("!H", 9) + b"x"]
    client = udp_client()
    c, relay, _ = associate(gate, client.getsockname()[1])
    client.sendto(wrap(*echo.addr, b"before the storm"), relay)  # open before mutated destinations
    assert client.recv(2000) == wrap(*echo.addr, b"before the storm")  # reach max_destinations
    for _ in range(CASES * 4):
        client.sendto(mutate(rng, rng.choice(seeds)), relay)
    request = b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00" + struct.pack("!H", client.getsockname()[1])
    for _ in range(CASES // 4):
        with socket.create_connection(gate.addr, timeout=5) as s:
            s.sendall(mutate(rng, request))
            s.settimeout(0.3)
            try:
                s.recv(100)
            except OSError:
                pass
    client.settimeout(0.5)  # drain the storm's echoes first: they may have filled our receive buffer,
    try:  # which would drop the answer looked for below
        while True:
            client.recv(65536)
    except TimeoutError:
        pass
    client.settimeout(3)
    client.sendto(wrap(*echo.addr, b"after the storm"), relay)
    while client.recv(2000) != wrap(*echo.addr, b"after the storm"):
        pass
    c.close()
    client.close()
    assert wait_for(lambda: gate.fd_count() <= baseline, timeout=10), (gate.fd_count(), baseline)
    assert gate.alive() and "Traceback" not in gate.stderr()
