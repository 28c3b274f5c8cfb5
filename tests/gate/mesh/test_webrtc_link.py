"""The WebRTC transport in one process, with real aiortc peer connections (ICE over this machine's own
address): the offering side (WebrtcMesh) and the answering side (Answerer) joined by a signaling
function in place of the HTTP/2 exchange, so a test can change what travels between them."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
from collections.abc import Callable
from typing import Any

import pytest

from gate.addr import Endpoint
from gate.config import PeerSpec
from gate.errors import GateError
from gate.flow import Close, Flow
from gate.mesh.transport import Exchanged, FlowMeta, Stream, StreamEnd
from gate.mesh.webrtc.channel import CHUNK, SOCKET_WRITE_HIGH, WINDOW
from gate.mesh.webrtc.dialer import WebrtcMesh
from gate.mesh.webrtc.link import MAX_CHANNELS, ChannelStream, Link, TransportDown
from gate.mesh.webrtc.wire import decode_signal, encode_signal, label_of

ID_A, ID_B = "a" * 52, "b" * 52
FLOOD = 2_500  # channels a hostile peer opens at once (2.5x the bound; see the README on 10,000)


class Served:
    """The answering gate's serving (gate.mesh.inbound's part): every flow is bridged to a local TCP
    echo server that answers the sha256 of what it got, or held unanswered (``hold``)."""

    def __init__(self, echo_port: int, hold: bool = False) -> None:
        self.echo_port = echo_port
        self.hold = hold
        self.streams: list[Stream] = []
        self.metas: list[FlowMeta | GateError] = []
        self.ends: list[StreamEnd] = []
        self.abandoned: list[str] = []

    def __call__(self, ident: str, peer: PeerSpec | None, meta: FlowMeta | GateError,
                 stream: Stream) -> Callable[[str], None]:
        self.streams.append(stream)
        self.metas.append(meta)
        if not self.hold:
            asyncio.get_running_loop().create_task(self._accept(stream))
        return self.abandoned.append

    async def _accept(self, stream: Stream) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.echo_port))
        upstream.setblocking(False)
        await stream.accept(upstream, self.ends.append)


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest, size = hashlib.sha256(), 0
        while chunk := await reader.read(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        writer.write(f"{digest.hexdigest()} {size}".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _pair(served: Served, transports: tuple[Any, ...] = ("webrtc",), tamper: Callable[[str], str] | None = None,
          ice_timeout: float = 5.0) -> WebrtcMesh:
    """Gate A (returned) offering to gate B, whose answerer serves with ``served``."""
    a_side = PeerSpec(name="b", transports=transports)
    b_side = PeerSpec(name="a", transports=("webrtc", "h2"))
    mesh = WebrtcMesh(ID_A, (a_side,), lambda *a: None, ice_timeout=ice_timeout)  # type: ignore[arg-type]
    answerer = WebrtcMesh(ID_B, (b_side,), mesh.send).answerer

    async def send(peer: str, kind: str, body: bytes, deadline: float) -> bytes:
        if tamper is not None:
            offer = decode_signal(body)
            body = encode_signal(type(offer)(gate=offer.gate, sdp=tamper(offer.sdp)))
        answer = await answerer.answer(served, Exchanged("webrtc", ID_A, b_side), body)
        if tamper is not None:
            message = decode_signal(answer)
            answer = encode_signal(type(message)(gate=message.gate, sdp=tamper(message.sdp)))
        return answer

    mesh.send = send
    mesh.peer_answerer = answerer  # type: ignore[attr-defined]
    return mesh


def _flow(port: int) -> Flow:
    return Flow(listener="test", client=Endpoint("127.0.0.1", 40000), dst=Endpoint("127.0.0.1", port))


async def _upload(sock: socket.socket, blob: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, blob)
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := await loop.sock_recv(sock, 65536):
        answer += chunk
    return answer


async def _close(mesh: WebrtcMesh) -> None:
    mesh.peer_answerer.close()  # type: ignore[attr-defined]
    await mesh.aclose()


def test_a_flow_crosses_with_half_close_and_both_ends_see_a_clean_end() -> None:
    async def scenario() -> None:
        server, port = await _echo_server()
        served = Served(port)
        mesh = _pair(served)
        loop = asyncio.get_running_loop()
        blob = os.urandom(3 << 20)
        sock = await mesh.open_stream("b", _flow(port), loop.time() + 10)
        assert sock is not None
        assert (await _upload(sock, blob)).decode() == f"{hashlib.sha256(blob).hexdigest()} {len(blob)}"
        sock.close()
        meta = served.metas[0]
        assert isinstance(meta, FlowMeta) and meta.dst == Endpoint("127.0.0.1", port) and meta.hops == 1
        async with asyncio.timeout(5):
            while not served.ends:
                await asyncio.sleep(0.01)
        assert served.ends[0].close == Close.EOF and served.ends[0].bytes_in == len(blob)
        link = mesh.state["b"].link
        assert link is not None and not link.bridges  # the channel is gone on both sides
        await _close(mesh)
        server.close()

    asyncio.run(scenario())


def test_a_dtls_fingerprint_other_than_the_signalled_one_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    def other_fingerprint(sdp: str) -> str:  # the sha-256 fingerprints signalled, one digit changed
        return re.sub(r"(a=fingerprint:sha-256 )(.)", lambda m: m.group(1) + ("0" if m.group(2) != "0" else "1"), sdp)

    async def scenario() -> None:
        served = Served(1)
        mesh = _pair(served, tamper=other_fingerprint)
        loop = asyncio.get_running_loop()
        with pytest.raises(TransportDown, match="webrtc to b"):
            await mesh.open_stream("b", _flow(1), loop.time() + 10)
        assert not served.streams  # no flow reached the answering side
        await _close(mesh)

    caplog.set_level(logging.DEBUG, logger="aiortc.rtcdtlstransport")
    asyncio.run(scenario())
    assert "fingerprint mismatch" in caplog.text  # refused for that reason, by aiortc's DTLS check


def test_ice_that_cannot_connect_falls_back_within_the_ice_timeout() -> None:
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes the checks, answers none
    blackhole.bind(("0.0.0.0", 0))
    port = blackhole.getsockname()[1]

    def unreachable(sdp: str) -> str:
        return re.sub(r"(a=candidate:\S+ \d+ udp \d+ )(\S+) (\d+)", lambda m: f"{m.group(1)}{m.group(2)} {port}", sdp)

    async def scenario() -> None:
        mesh = _pair(Served(1), transports=("webrtc", "h2"), tamper=unreachable, ice_timeout=1.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await mesh.open_stream("b", _flow(1), started + 10) is None  # None: HTTP/2 carries it
        assert loop.time() - started < 3
        while mesh.state["b"].connecting is not None:  # the attempt's own end, a moment after the flow's
            await asyncio.sleep(0.01)
        assert mesh.state["b"].retry_at > loop.time()  # not tried again at once (backoff)
        assert await mesh.open_stream("b", _flow(1), loop.time() + 10) is None
        await _close(mesh)

    try:
        asyncio.run(scenario())
    finally:
        blackhole.close()


def test_a_peer_opening_channels_without_end_is_bounded() -> None:
    async def scenario() -> None:
        server, port = await _echo_server()
        served = Served(port, hold=True)
        mesh = _pair(served)
        loop = asyncio.get_running_loop()
        served.hold = False
        first = await mesh.open_stream("b", _flow(port), loop.time() + 10)  # brings the link up
        assert first is not None
        served.hold = True
        link = mesh.state["b"].link
        assert link is not None
        answering: Link = next(iter(mesh.peer_answerer.links.values()))  # type: ignore[attr-defined]
        flood = [link.pc.createDataChannel(f"junk{i}") for i in range(FLOOD)]  # past our own bound
        async with asyncio.timeout(90):
            while answering.refused_channels < FLOOD - MAX_CHANNELS + 1:
                await asyncio.sleep(0.05)
        assert len(answering.bridges) == MAX_CHANNELS  # the first flow's, and the flood's up to the bound
        for channel in flood:
            channel.close()
        async with asyncio.timeout(30):
            while len(answering.bridges) > 1:
                await asyncio.sleep(0.05)
        assert all(isinstance(m, GateError) for m in served.metas[1:])  # junk labels carry no flow
        served.hold = False
        blob = os.urandom(1 << 20)
        sock = await mesh.open_stream("b", _flow(port), loop.time() + 10)  # the connection serves on
        assert sock is not None
        assert (await _upload(sock, blob)).decode() == f"{hashlib.sha256(blob).hexdigest()} {len(blob)}"
        sock.close()
        first.close()
        await _close(mesh)
        server.close()

    asyncio.run(scenario())


def test_a_slow_reader_stops_the_sender_within_the_window() -> None:
    """The served upstream reads nothing for a while: the serving gate buffers at most the window
    (acknowledgements stop while its socket is full), and the dialling gate stops reading its socket."""

    async def scenario() -> None:
        accepted: asyncio.Queue[socket.socket] = asyncio.Queue()
        holder = socket.create_server(("127.0.0.1", 0))
        holder.setblocking(False)
        port = holder.getsockname()[1]
        served = Served(port)
        mesh = _pair(served)
        loop = asyncio.get_running_loop()
        sock = await mesh.open_stream("b", _flow(port), loop.time() + 10)
        assert sock is not None
        accepted.put_nowait((await loop.sock_accept(holder))[0])
        upstream = await accepted.get()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        blob = os.urandom(48 << 20)
        sender = loop.create_task(loop.sock_sendall(sock, blob))
        link = mesh.state["b"].link
        answering: Link = next(iter(mesh.peer_answerer.links.values()))  # type: ignore[attr-defined]
        assert link is not None
        dialling_bridge = next(iter(link.bridges))
        serving_bridge = next(iter(answering.bridges))
        await asyncio.sleep(3)  # nothing reads the upstream
        assert not sender.done() and dialling_bridge.reading_paused
        assert dialling_bridge.sent - dialling_bridge.acked <= WINDOW
        assert serving_bridge.transport is not None
        assert serving_bridge.transport.get_write_buffer_size() <= WINDOW + SOCKET_WRITE_HIGH
        got = bytearray()
        upstream.setblocking(False)
        while len(got) < len(blob):  # now read: everything arrives, in order
            got += await loop.sock_recv(upstream, 1 << 20)
        assert got == blob
        await sender
        sock.close()
        upstream.close()
        holder.close()
        await _close(mesh)

    asyncio.run(scenario())


def test_a_peer_sending_past_the_window_is_cut() -> None:
    async def scenario() -> None:
        server, port = await _echo_server()
        served = Served(port)
        mesh = _pair(served)
        loop = asyncio.get_running_loop()
        first = await mesh.open_stream("b", _flow(port), loop.time() + 10)  # brings the link up
        assert first is not None
        served.hold = True  # the next flow's upstream never connects: nothing is acknowledged
        link = mesh.state["b"].link
        assert link is not None
        channel = link.pc.createDataChannel(label_of(FlowMeta.of(_flow(port))))
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await opened.wait()
        for _ in range(WINDOW // CHUNK + 1):  # a peer that ignores the window
            channel.send(b"\0" * CHUNK)
        async with asyncio.timeout(20):
            while len(served.streams) < 2 or not served.abandoned:
                await asyncio.sleep(0.05)
        stream = served.streams[1]
        assert isinstance(stream, ChannelStream)
        assert stream.bridge.error == f"peer sent past the window ({WINDOW} bytes)"
        assert stream.bridge.received == WINDOW + CHUNK and not stream.bridge.early  # dropped, not kept
        assert served.abandoned == ["channel reset"]  # the serving side gave up on it
        first.close()
        await _close(mesh)
        server.close()

    asyncio.run(scenario())
