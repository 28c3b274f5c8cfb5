"""A trusted peer gone bad: abuse of the h2 listener by a certified peer (a raw HTTP/2 client in the test).

Gate B runs as its own process with an h2 listener; the test holds the peer's certificate (configured
on B as peer ``a`` with an allow list) and speaks HTTP/2 itself with the ``h2`` library over TLS 1.3, so
it can do what a compromised gate would: send DATA before the answer, flood PINGs without reading, open
and reset streams in a loop, drop the tunnel in the middle of setting streams up, exceed the advertised
limits. Each test asserts that B's descriptors and memory stay bounded, that the upstream sees no more
connects than the flows that were really wanted, and that B still serves a well-behaved peer afterwards.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

from tests.conftest import free_port
from tests.e2e.test_mesh import keygen

MiB = 1 << 20


def payload(tag: int, size: int) -> bytes:
    """What the upstream sends when asked ``send:<tag>:<size>``: different bytes for every tag."""
    return random.Random(tag).randbytes(size)


class Upstream:
    """A TCP server counting the connections it accepts; it holds them open until the far end closes,
    and knows how many are still open (an upstream socket B forgot shows up here). It answers b"ping"
    with b"pong", and b"send:<tag>:<size>" with ``payload(tag, size)`` and a FIN."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.open = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    if data.startswith(b"ping"):
                        conn.sendall(b"pong")
                    elif data.startswith(b"send:"):
                        _, tag, size = data.decode().split(":")
                        conn.sendall(payload(int(tag), int(size)))
                        conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        with self.lock:
            self.open -= 1

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


@dataclass
class Target:
    gate: Any
    port: int  # B's h2 listener
    certs: Path  # the peer's identity directory (cert.pem, key.pem)


@pytest.fixture
def gate_b(start_gate: Any, tmp_path: Path, upstream: Upstream, black_hole: int) -> Target:
    """Gate B: an h2 listener whose peer ``a`` (the test) may reach the counting upstream and a black hole."""
    keygen(tmp_path / "a")
    keygen(tmp_path / "b")
    port = free_port()
    gate = start_gate(
        [{"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{port}"}],
        routes=[{"action": "direct", "name": "out"}],
        mesh={"identity": str(tmp_path / "b")},
        peers=[{"name": "a", "cert": str(tmp_path / "a" / "cert.pem"),
                "allow": [{"dst": ["127.0.0.1/32"], "port": [upstream.port, black_hole]}]}],
        log={"level": "info", "access": str(tmp_path / "access-b.log")},
    )
    gate.access_path = tmp_path / "access-b.log"
    return Target(gate, port, tmp_path / "a")


def rss(gate: Any) -> int:
    """B's resident memory, bytes."""
    for line in Path(f"/proc/{gate.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Peer:
    """The compromised gate: TLS 1.3 with the peer's certificate, ALPN h2, HTTP/2 by hand."""

    def __init__(self, target: Target, rcvbuf: int | None = None) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        ctx.load_cert_chain(target.certs / "cert.pem", target.certs / "key.pem")
        raw = socket.socket()
        if rcvbuf is not None:  # before connect, so the kernel absorbs little of what B sends
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", target.port))
        self.tls = ctx.wrap_socket(raw)
        assert self.tls.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()
        self.events: list[Any] = []

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.tls.sendall(data)

    def connect(self, port: int, end: bool = False) -> int:
        """A CONNECT stream to 127.0.0.1:``port``, as a gate sends it."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", f"127.0.0.1:{port}"),
                                           ("ugate-client", "127.0.0.1:5555"), ("ugate-hops", "1")],
                               end_stream=end)
        return stream_id

    def read(self, timeout: float = 5.0) -> list[Any]:
        """Events from what B sent within ``timeout`` (at least one read); [] once B closed."""
        self.tls.settimeout(timeout)
        try:
            data = self.tls.recv(1 << 20)
        except TimeoutError:
            return []
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            raise EOFError
        events = self.conn.receive_data(data)
        self.events += events
        self.flush()
        return events

    def wait(self, kind: type, timeout: float = 5.0, stream_id: int | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if isinstance(event, kind) and (stream_id is None or getattr(event, "stream_id", None) == stream_id):
                    self.events.remove(event)
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind.__name__} within {timeout}s")
            self.read(max(deadline - time.monotonic(), 0.01))

    def poll(self) -> None:
        """Take in whatever B has sent by now, without waiting."""
        self.tls.setblocking(False)
        try:
            while incoming := self.tls.recv(1 << 20):
                self.events += self.conn.receive_data(incoming)
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        finally:
            self.tls.setblocking(True)
        self.flush()

    def close(self) -> None:
        self.tls.close()


def serves_a_normal_flow(target: Target, upstream: Upstream) -> None:
    """A fresh, well-behaved tunnel: CONNECT answered 200, bytes reach the upstream and come back."""
    peer = Peer(target)
    try:
        stream_id = peer.connect(upstream.port)
        peer.flush()
        response = peer.wait(h2.events.ResponseReceived, stream_id=stream_id)
        assert dict(response.headers)[b":status"] == b"200"
        peer.conn.send_data(stream_id, b"ping")
        peer.flush()
        data = peer.wait(h2.events.DataReceived, stream_id=stream_id)
        assert data.data == b"pong"
    finally:
        peer.close()


def test_data_before_the_upstream_connects_is_bounded_by_the_window(gate_b: Target, upstream: Upstream,
                                                                     black_hole: int) -> None:
    """DATA for a stream whose upstream is still connecting (a black hole: SYNs dropped) is held, and its
    credit is not returned until it leaves: the peer can push one window and no more (it was 1 GiB in
    8 s when the credit came back at once). Reset, the stream gives the connection its share back."""
    b = gate_b.gate
    peer = Peer(gate_b)
    peer.wait(h2.events.RemoteSettingsChanged)
    before = rss(b)
    stream_id = peer.connect(black_hole)
    chunk = b"x" * 16384
    sent, deadline = 0, time.monotonic() + 3
    while time.monotonic() < deadline:
        window = min(peer.conn.local_flow_control_window(stream_id), len(chunk))
        if window <= 0:
            peer.read(0.2)  # wait for credit
            continue
        peer.conn.send_data(stream_id, chunk[:window])
        sent += window
        peer.flush()
        if sent % MiB == 0:
            peer.tls.setblocking(False)
            try:
                incoming = peer.tls.recv(1 << 20)
            except (ssl.SSLWantReadError, BlockingIOError):
                incoming = b""
            peer.tls.setblocking(True)
            if incoming:
                peer.events += peer.conn.receive_data(incoming)
    window = 16 * MiB  # MeshSpec.window: B's initial stream and connection window
    assert sent <= window + 65535, f"{sent / MiB:.0f} MiB accepted before the upstream connected"
    assert rss(b) - before < 64 * MiB
    peer.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    peer.flush()
    # the reset stream's bytes count against the connection no more: a new stream can use the window
    deadline = time.monotonic() + 5
    while peer.conn.outbound_flow_control_window < window // 2 and time.monotonic() < deadline:
        peer.read(0.2)
    assert peer.conn.outbound_flow_control_window >= window // 2, "the connection's credit was not returned"
    assert upstream.accepted == 0
    peer.close()
    serves_a_normal_flow(gate_b, upstream)
    assert wait_for(lambda: upstream.open == 0)


def test_a_ping_flood_from_a_peer_that_never_reads_is_bounded(gate_b: Target, upstream: Upstream) -> None:
    """PINGs from a peer that reads none of the ACKs (+34 MiB queued in B per 2M PINGs before): past
    MAX_UNREAD_CONTROL answers queued while its writes are paused, B ends the connection, so what it
    holds for the peer stays bounded."""
    b = gate_b.gate
    peer = Peer(gate_b, rcvbuf=16384)
    peer.wait(h2.events.RemoteSettingsChanged)
    before = rss(b)
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"  # PING, 8 bytes of opaque data
    burst = ping * 60000  # ~1 MiB
    sent, started = 0, time.monotonic()
    peer.tls.settimeout(2)
    try:
        while sent < 3_000_000 and time.monotonic() - started < 30:  # 51 MB: more than the kernel buffers hold
            peer.tls.sendall(burst)
            sent += 60000
    except TimeoutError:
        pass  # B stopped reading
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass  # B cut the connection
    # Only now read: B must have ended the connection by itself (a B that queued every ACK answers them all
    # and then waits for more, so the read times out)
    closed, deadline = False, time.monotonic() + 8
    peer.tls.settimeout(1)
    while not closed and time.monotonic() < deadline:
        try:
            closed = not peer.tls.recv(1 << 20)
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            closed = True
    grown = rss(b) - before
    peer.close()
    assert closed, f"B kept the connection of a peer that read none of {sent} PING ACKs"
    assert grown < 16 * MiB, f"B grew {grown / MiB:.0f} MiB for {sent} unread PINGs"
    serves_a_normal_flow(gate_b, upstream)


def test_rapid_reset_dials_nothing_and_ends_the_connection(gate_b: Target, upstream: Upstream) -> None:
    """HEADERS + RST_STREAM pairs (CVE-2023-44487): a reset stream is never dialled, and past the limit
    B answers GOAWAY ENHANCE_YOUR_CALM (20,000 pairs made 10,684 upstream connects before)."""
    b = gate_b.gate
    serves_a_normal_flow(gate_b, upstream)  # the baseline includes what the first flow opens (the log)
    baseline = b.fd_count()
    connects = upstream.accepted
    peer = Peer(gate_b)
    peer.wait(h2.events.RemoteSettingsChanged)
    pairs = 0
    try:
        for _ in range(20):
            for _ in range(1000):
                stream_id = peer.connect(upstream.port)
                peer.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                pairs += 1
            peer.flush()
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass  # B hung up on us
    goaway = None
    try:
        goaway = peer.wait(h2.events.ConnectionTerminated, timeout=5)
    except (EOFError, h2.exceptions.ProtocolError):
        pass
    peer.close()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, goaway
    time.sleep(0.5)  # connects under way would arrive now
    connects = upstream.accepted - connects
    assert connects <= 10, f"{connects} upstream connects for {pairs} reset streams"
    assert b.alive()
    serves_a_normal_flow(gate_b, upstream)
    assert wait_for(lambda: b.fd_count() <= baseline)


def test_a_tunnel_lost_while_streams_are_set_up_leaves_no_socket(gate_b: Target, upstream: Upstream) -> None:
    """The peer opens streams and drops the tunnel (TCP reset) while B is still connecting their upstreams:
    every upstream socket is closed, whichever step its stream had reached (6,018 descriptors were still
    held 64 s after a peer with 9,000 streams dropped)."""
    b = gate_b.gate
    serves_a_normal_flow(gate_b, upstream)
    baseline = b.fd_count()
    for _ in range(3):
        peer = Peer(gate_b)
        peer.wait(h2.events.RemoteSettingsChanged)
        for _ in range(900):
            peer.connect(upstream.port)
        peer.flush()
        wait_for(lambda before=upstream.accepted: upstream.accepted > before + 300, 5)  # mid-way through setup
        peer.tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset: no GOAWAY, no END_STREAM
    assert wait_for(lambda: upstream.open == 0, 8), f"{upstream.open} upstream sockets still open"
    assert wait_for(lambda: b.fd_count() <= baseline, 3), f"B holds {b.fd_count() - baseline} descriptors more"
    serves_a_normal_flow(gate_b, upstream)


def test_advertised_limits_are_sane_and_enforced(gate_b: Target, upstream: Upstream) -> None:
    """B advertises a bounded MAX_CONCURRENT_STREAMS and MAX_HEADER_LIST_SIZE, and holds a peer to them:
    one stream more than allowed, or a header list larger than advertised, ends the connection."""
    b = gate_b.gate
    peer = Peer(gate_b)
    settings = peer.wait(h2.events.RemoteSettingsChanged).changed_settings
    max_streams = settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value
    max_headers = settings[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE].new_value
    assert max_streams <= 1000 and max_headers <= 64 << 10
    peer.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1 << 20  # a peer that ignores it
    peer.conn.remote_settings.acknowledge()
    for _ in range(max_streams + 1):
        peer.connect(upstream.port)
    peer.flush()
    goaway = peer.wait(h2.events.ConnectionTerminated, timeout=8)
    assert goaway.error_code in (h2.errors.ErrorCodes.PROTOCOL_ERROR, h2.errors.ErrorCodes.REFUSED_STREAM)
    peer.close()
    assert wait_for(lambda: upstream.open == 0, 8)
    connects = upstream.accepted
    peer = Peer(gate_b)
    peer.wait(h2.events.RemoteSettingsChanged)
    stream_id = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", f"127.0.0.1:{upstream.port}"),
                                       ("ugate-host", "h" * (max_headers + 100))])
    peer.flush()
    with pytest.raises((EOFError, AssertionError)):
        peer.wait(h2.events.ResponseReceived, stream_id=stream_id, timeout=3)
    peer.close()
    assert upstream.accepted == connects  # the oversized request dialled nothing
    assert b.alive()
    serves_a_normal_flow(gate_b, upstream)


def frame(kind: int, flags: int, stream_id: int, body: bytes) -> bytes:
    return len(body).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + body


HEADERS, CONTINUATION, END_HEADERS = 0x1, 0x9, 0x4


def stable_rss(gate: Any, timeout: float = 10.0) -> int:
    """B's resident memory once it has stopped growing for half a second (or at ``timeout``)."""
    last, deadline = rss(gate), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss(gate)
        if now <= last + MiB // 4:
            return now
        last = now
    return last


def test_a_continuation_flood_is_cut_before_it_is_buffered(gate_b: Target, upstream: Upstream) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames of B's maximum frame size (16 MiB): h2 holds
    64 of them before it decodes the block and checks the header-list limit (B grew by the 640 MiB sent
    and said nothing). B measures the block from its frame headers and ends the connection with
    GOAWAY ENHANCE_YOUR_CALM once it is past MAX_HEADER_BLOCK; a block split into CONTINUATIONs within
    the limit is still served."""
    b = gate_b.gate
    peer = Peer(gate_b)
    settings = peer.wait(h2.events.RemoteSettingsChanged).changed_settings
    max_frame = settings[h2.settings.SettingCodes.MAX_FRAME_SIZE].new_value
    peer.connect(upstream.port)  # stream 1, as h2 frames it: one HEADERS frame, re-cut below
    wire = peer.conn.data_to_send()
    assert wire[3] == HEADERS and wire[4] & END_HEADERS
    block = wire[9:]
    third = len(block) // 3  # a real block, split: B must answer it
    peer.tls.sendall(frame(HEADERS, 0, 1, block[:third]) + frame(CONTINUATION, 0, 1, block[third:2 * third])
                     + frame(CONTINUATION, END_HEADERS, 1, block[2 * third:]))
    response = peer.wait(h2.events.ResponseReceived, stream_id=1)
    assert dict(response.headers)[b":status"] == b"200"
    before = stable_rss(b)
    peer.tls.sendall(frame(HEADERS, 0, 3, peer.conn.encoder.encode([(":method", "CONNECT")])))
    flood = frame(CONTINUATION, 0, 3, bytes(max_frame))
    sent, goaway = 0, None
    try:
        while sent < 40 and goaway is None:
            peer.tls.sendall(flood)
            sent += 1
            peer.poll()
            goaway = next((e for e in peer.events if isinstance(e, h2.events.ConnectionTerminated)), None)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError, EOFError):
        pass  # B hung up on us
    grown = stable_rss(b) - before
    print(f"continuation flood: {sent} frames of {max_frame} bytes sent, B grew {grown / MiB:.0f} MiB")
    peer.close()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, \
        f"B took {sent} CONTINUATION frames of {max_frame} bytes and grew {grown / MiB:.0f} MiB"
    assert grown < 48 * MiB, f"B grew {grown / MiB:.0f} MiB"
    assert b.alive()
    serves_a_normal_flow(gate_b, upstream)


def test_read_ahead_across_a_tunnels_streams_is_bounded_and_nothing_stalls(gate_b: Target,
                                                                           upstream: Upstream) -> None:
    """Streams whose upstreams send while the peer keeps every window shut: each stream may read PENDING_HIGH
    (1 MiB) ahead, but all of one tunnel's together only MAX_PENDING (64 MiB) (250 streams held 286 MiB
    before, 66 MiB now). Then the windows open: every stream, paused for its own read-ahead or for the tunnel's,
    resumes and delivers its bytes exactly, FIN included."""
    b = gate_b.gate
    streams, size = 250, 5 * MiB // 4
    peer = Peer(gate_b)
    peer.wait(h2.events.RemoteSettingsChanged)
    peer.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0,
                               h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20})
    peer.flush()
    peer.wait(h2.events.SettingsAcknowledged)
    before = stable_rss(b)
    ids = []
    for tag in range(streams):
        stream_id = peer.connect(upstream.port)
        peer.conn.send_data(stream_id, f"send:{tag}:{size}".encode())
        ids.append(stream_id)
    peer.flush()
    for stream_id in ids:
        response = peer.wait(h2.events.ResponseReceived, stream_id=stream_id, timeout=10)
        assert dict(response.headers)[b":status"] == b"200"
    grown = stable_rss(b) - before
    print(f"read-ahead: {streams} streams of {size} bytes behind shut windows, B grew {grown / MiB:.0f} MiB")
    assert grown < 100 * MiB, f"B grew {grown / MiB:.0f} MiB for {streams} streams behind shut windows"
    received = {stream_id: bytearray() for stream_id in ids}
    ended: set[int] = set()
    peer.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 * MiB})
    peer.conn.increment_flow_control_window(256 * MiB)
    peer.flush()
    deadline = time.monotonic() + 60
    while len(ended) < streams and time.monotonic() < deadline:
        for event in peer.read(1.0):
            if isinstance(event, h2.events.DataReceived):
                received[event.stream_id] += event.data
                peer.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                raise AssertionError(f"stream {event.stream_id} reset: {event.error_code!r}")
        peer.flush()
    short = [sid for sid in ids if len(received[sid]) != size]
    assert not short, f"{len(short)} streams stalled, e.g. {short[0]}: {len(received[short[0]])} of {size} bytes"
    assert len(ended) == streams
    for tag, stream_id in enumerate(ids):
        assert received[stream_id] == payload(tag, size), f"stream {stream_id} is not byte-exact"
    peer.close()
    assert wait_for(lambda: upstream.open == 0, 8)
    serves_a_normal_flow(gate_b, upstream)


def test_a_peer_that_says_goaway_and_never_reads_is_cut_after_the_linger(gate_b: Target, upstream: Upstream) -> None:
    """A closing connection used to wait for ever to flush what it had queued for a peer that stopped
    reading (held with its buffers until the peer read or died); now it is cut CLOSE_LINGER after the
    close, whatever the peer does."""
    peer = Peer(gate_b, rcvbuf=4096)
    peer.wait(h2.events.RemoteSettingsChanged)
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    peer.tls.sendall(ping * 9000)  # ~150 KB of ACKs for B to queue: more than the kernel takes for a peer
    peer.conn.close_connection()  # that reads nothing (and under MAX_UNREAD_CONTROL, so B does not end it)
    peer.flush()

    def served() -> int:
        out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{gate_b.port} )"],
                             capture_output=True, text=True, check=True).stdout
        return len(out.splitlines())

    assert wait_for(lambda: served() == 0, timeout=4), "B still holds the connection of a peer that said GOAWAY"
    peer.close()
    serves_a_normal_flow(gate_b, upstream)
