"""gate.mesh.webrtc.sctp_tuning: the announcement codec and the packet bounds (pure), the aiortc version
pin, and real peer connections in one process: two ugate links agree on large packets, a ugate link
against a plain aiortc peer keeps the standard size and moves bytes exactly both ways, and a peer
announcing absurd sizes is bounded."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import aiortc
import pytest
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from hypothesis import given
from hypothesis import strategies as st

from gate.mesh.webrtc import sctp_tuning
from gate.mesh.webrtc.dialer import WebrtcMesh
from gate.mesh.webrtc.link import CONTROL_LABEL, Link, TransportDown
from gate.mesh.webrtc.sctp_tuning import (
    ETHERNET_MTU,
    MAX_PACKET,
    STANDARD_PACKET,
    Announcement,
    BadAnnouncement,
    announcement,
    clamp_packet,
    message_size,
    packet_size,
    parse_announcement,
)
from gate.mesh.webrtc.wire import SignalMessage, decode_signal, encode_signal, meta_of_label
from tests.fuzzing import budget
from tests.gate.mesh.test_webrtc_link import ID_B, Served, _close, _echo_server, _flow, _pair, _upload

# -- pure -----------------------------------------------------------------------------------------


def test_announcements_round_trip_and_garbage_is_refused() -> None:
    assert parse_announcement(announcement(16384)) == Announcement(16384)
    assert parse_announcement("packet 0") == Announcement(0)
    for text in ("", "packet", "packet ", "packet -1", "packet 1.5", "packet 99999999999", "packets 1200",
                 "PACKET 1200", "packet ١٢٣", "packet 1200 ", "x" * 100, "ok", "eof"):
        with pytest.raises(BadAnnouncement):
            parse_announcement(text)


@budget(500)
@given(st.text(max_size=40))
def test_fuzz_an_announcement_or_bad_announcement(text: str) -> None:
    try:
        got = parse_announcement(text)
    except BadAnnouncement:
        return
    assert isinstance(got, Announcement) and 0 <= got.packet < 10**10


@budget(500)
@given(st.integers(min_value=0, max_value=2**64), st.integers(min_value=0, max_value=2**20))
def test_fuzz_any_announced_size_is_bounded(announced: int, path: int) -> None:
    got = clamp_packet(announced, path)
    assert STANDARD_PACKET <= got <= MAX_PACKET
    if path <= ETHERNET_MTU:
        assert got == STANDARD_PACKET  # an Ethernet-sized route never carries larger packets
    if announced <= STANDARD_PACKET:
        assert got == STANDARD_PACKET


def test_the_bounds_on_loopback_jumbo_and_ethernet_routes() -> None:
    assert clamp_packet(2**32 - 1, 65536) == MAX_PACKET  # absurd: the DTLS record's limit
    assert clamp_packet(8000, 65536) == 8000
    assert clamp_packet(MAX_PACKET, 9000) == 9000 - sctp_tuning.PATH_OVERHEAD
    assert clamp_packet(MAX_PACKET, 1500) == STANDARD_PACKET
    assert clamp_packet(MAX_PACKET, 0) == STANDARD_PACKET  # route unknown


def test_messages_are_whole_chunks() -> None:
    for packet in (STANDARD_PACKET, 1500, 8904, MAX_PACKET):
        userdata = (packet - 28) // 4 * 4
        size = message_size(packet)
        assert size % userdata == 0 and size <= max(16 << 10, userdata)
    assert message_size(MAX_PACKET) < MAX_PACKET  # one packet's DATA chunk


def test_a_sized_association_replaces_exactly_the_methods_that_read_the_packet_size() -> None:
    sized = sctp_tuning._sized(8192)
    assert sctp_tuning._sized(8192) is sized  # one class per size
    replaced = {k for k, v in vars(sized).items() if callable(v) and not k.startswith("__")}
    assert replaced == {"_receive_sack_chunk", "_send", "_t3_expired", "_transmit"}
    assert sized._ugate_packet == 8192


# -- the version pin --------------------------------------------------------------------------------


def test_another_aiortc_version_is_left_stock(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                              ) -> None:
    monkeypatch.setattr(aiortc, "__version__", "1.17.0")
    try:
        with caplog.at_level(logging.WARNING, logger="ugate"):
            module = importlib.reload(sctp_tuning)
        assert not module.PATCHED
        assert any("1.17.0" in r.getMessage() for r in caplog.records)

        async def scenario() -> None:
            pc = RTCPeerConnection()
            assert not module.tune(pc) and not module.tuned(pc)
            assert module.receive_limit(pc) == STANDARD_PACKET
            assert module.use_packet(pc, MAX_PACKET) == STANDARD_PACKET
            await pc.close()

        asyncio.run(scenario())
    finally:
        monkeypatch.undo()
        importlib.reload(sctp_tuning)
    assert (aiortc.__version__ == sctp_tuning.AIORTC_VERSION) == sctp_tuning.PATCHED


# -- real peer connections ----------------------------------------------------------------------------


async def _wait(condition: Callable[[], bool], seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.02)


def _dtls_stats(pc: RTCPeerConnection) -> Any:
    """The DTLS transport's counters (getStats leaves out a data-only connection's)."""
    assert pc.sctp is not None
    return next(s for s in pc.sctp.transport._get_stats().values() if s.type == "transport")


async def _bytes_per_datagram(pc: RTCPeerConnection) -> float:
    stats = _dtls_stats(pc)
    return float(stats.bytesSent / max(stats.packetsSent, 1))


def test_two_ugate_links_agree_on_large_packets_and_move_bytes_exactly() -> None:
    async def scenario() -> None:
        server, port = await _echo_server()
        mesh = _pair(Served(port))
        loop = asyncio.get_running_loop()
        sock = await mesh.open_stream("b", _flow(port), loop.time() + 10)
        assert sock is not None
        offering = mesh.state["b"].link
        answering: Link = next(iter(mesh.peer_answerer.links.values()))  # type: ignore[attr-defined]
        assert offering is not None
        await _wait(lambda: packet_size(offering.pc) == MAX_PACKET and packet_size(answering.pc) == MAX_PACKET)
        assert offering.message_size == message_size(MAX_PACKET)
        blob = os.urandom(8 << 20)
        assert (await _upload(sock, blob)).decode() == f"{hashlib.sha256(blob).hexdigest()} {len(blob)}"
        assert await _bytes_per_datagram(offering.pc) > 8000  # the upload went in large datagrams
        before = _dtls_stats(answering.pc)
        blob = os.urandom(8 << 20)
        sock2 = await mesh.open_stream("b", _flow(port), loop.time() + 10)
        assert sock2 is not None
        assert (await _upload(sock2, blob)).decode() == f"{hashlib.sha256(blob).hexdigest()} {len(blob)}"
        after = _dtls_stats(answering.pc)
        received, sent = after.packetsReceived - before.packetsReceived, after.packetsSent - before.packetsSent
        assert received > 500 and sent < received / 3, (received, sent)  # stock aiortc: a SACK per packet
        sock2.close()
        sock.close()
        await _close(mesh)
        server.close()

    asyncio.run(scenario())


class StockPeer:
    """A plain aiortc answerer (no tuning, no announcement unless ``announce`` is set) that speaks the
    flow channels' protocol itself: ``ok``, then echoes every byte back, acknowledges, and ends with ``eof``."""

    def __init__(self, announce: str | None = None) -> None:
        self.announce = announce
        self.pc: RTCPeerConnection | None = None
        self.control: RTCDataChannel | None = None
        self.echoed = 0

    async def answer(self, peer: str, kind: str, body: bytes, deadline: float) -> bytes:
        offer = decode_signal(body)
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.on("datachannel", self._channel)
        await pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return encode_signal(SignalMessage(gate=ID_B, sdp=pc.localDescription.sdp))

    def _channel(self, channel: RTCDataChannel) -> None:
        if channel.label == CONTROL_LABEL:
            self.control = channel
            if self.announce is not None:
                channel.send(self.announce)
                channel.send("packet 1")  # a second announcement is ignored
            return
        meta_of_label(channel.label)
        channel.send("ok")

        def message(data: bytes | str) -> None:
            if isinstance(data, bytes):
                channel.send(data)
                channel.send(f"ack {len(data)}")
                self.echoed += len(data)
            elif data == "eof":
                channel.send("eof")

        channel.on("message", message)

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()


def _with_stock(peer: StockPeer) -> WebrtcMesh:
    mesh = _pair(Served(1))
    mesh.send = peer.answer
    mesh.peer_answerer.close()  # type: ignore[attr-defined]  # the stock peer answers instead
    return mesh


async def _echo(sock: socket.socket, blob: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    reader = loop.create_task(_read_all(sock))
    await loop.sock_sendall(sock, blob)
    sock.shutdown(socket.SHUT_WR)
    return await reader


async def _read_all(sock: socket.socket) -> bytes:
    loop, got = asyncio.get_running_loop(), bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 16):
        got += chunk
    return bytes(got)


def test_against_plain_aiortc_the_standard_path_moves_bytes_exactly_both_ways() -> None:
    async def scenario() -> None:
        stock = StockPeer()
        mesh = _with_stock(stock)
        loop = asyncio.get_running_loop()
        sock = await mesh.open_stream("b", _flow(9), loop.time() + 10)
        assert sock is not None
        link = mesh.state["b"].link
        assert link is not None and sctp_tuning.tuned(link.pc)  # delayed SACKs toward a stock peer
        blob = os.urandom(3 << 20)
        got = await _echo(sock, blob)
        assert len(got) == len(blob) and hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
        assert packet_size(link.pc) == STANDARD_PACKET  # the stock peer announced nothing
        assert await _bytes_per_datagram(link.pc) < 1300
        assert link.announced and stock.echoed == len(blob)
        sock.close()
        await mesh.aclose()
        await stock.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("said", "packet"), [("packet 4294967295", MAX_PACKET), ("packet 9999999999", MAX_PACKET),
                                              ("packet 1", STANDARD_PACKET), ("packet 0", STANDARD_PACKET)])
def test_a_peer_announcing_absurd_sizes_is_bounded(said: str, packet: int) -> None:
    async def scenario() -> None:
        stock = StockPeer(announce=said)
        mesh = _with_stock(stock)
        loop = asyncio.get_running_loop()
        sock = await mesh.open_stream("b", _flow(9), loop.time() + 10)
        assert sock is not None
        link = mesh.state["b"].link
        assert link is not None
        await _wait(lambda: packet_size(link.pc) != STANDARD_PACKET or packet == STANDARD_PACKET)
        await asyncio.sleep(0.2)  # (the announcement has arrived: the stock peer sent it before any flow)
        assert packet_size(link.pc) == packet  # loopback's route: only the DTLS record bounds it
        sock.close()
        await mesh.aclose()
        await stock.close()

    asyncio.run(scenario())


def test_a_peer_saying_garbage_on_the_control_channel_loses_the_connection() -> None:
    async def scenario() -> None:
        stock = StockPeer(announce="packet banana")
        mesh = _with_stock(stock)
        loop = asyncio.get_running_loop()
        try:
            sock = await mesh.open_stream("b", _flow(9), loop.time() + 10)
        except TransportDown:  # the link may go before the flow's answer
            sock = None
        state = mesh.state["b"]
        await _wait(lambda: state.link is None)  # closed and forgotten: the next flow connects anew
        if sock is not None:
            sock.close()
        await mesh.aclose()
        await stock.close()

    asyncio.run(scenario())
