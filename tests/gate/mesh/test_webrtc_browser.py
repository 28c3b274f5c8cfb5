"""Browser peers' pure codecs (gate.mesh.webrtc.browser: offer bodies, channel labels) on the offer
Chromium 156 sent (captured by tests/e2e/test_webrtc_chromium.py), table cases and property fuzzing; and
the per-channel bounds of ``BrowserChannel`` on a real socketpair."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import cast

import pytest
from aiortc import RTCDataChannel
from hypothesis import given
from hypothesis import strategies as st
from pyee.asyncio import AsyncIOEventEmitter

from gate.addr import Endpoint
from gate.errors import ClientProtocolError
from gate.mesh.webrtc.browser import (
    MAX_EARLY,
    MAX_UPLOAD_BUFFER,
    BrowserChannel,
    answer_body,
    offer_of,
    target_of_label,
)
from gate.mesh.webrtc.wire import SignalError
from tests.fuzzing import budget

CHROMIUM_OFFER = (Path(__file__).parent / "fixtures" / "chromium-156-offer.sdp").read_bytes()
CONTENT_TYPES = ["application/sdp", "application/json", "application/sdp; charset=utf-8", "APPLICATION/JSON",
                 "text/plain", ""]


def test_chromium_offers_pass_as_sdp_and_as_json() -> None:
    sdp, as_json = offer_of(CHROMIUM_OFFER, "application/sdp")
    assert sdp == CHROMIUM_OFFER.decode() and not as_json
    body = json.dumps({"type": "offer", "sdp": CHROMIUM_OFFER.decode()}).encode()
    assert offer_of(body, "application/json; charset=UTF-8") == (CHROMIUM_OFFER.decode(), True)
    assert json.loads(answer_body("v=0\r\n", True)[0]) == {"type": "answer", "sdp": "v=0\r\n"}
    assert answer_body("v=0\r\n", False) == (b"v=0\r\n", "application/sdp")


@pytest.mark.parametrize(("body", "ctype", "why"), [
    (CHROMIUM_OFFER, "text/plain", "must be"),
    (CHROMIUM_OFFER, "", "must be"),
    (b"\xff" + CHROMIUM_OFFER, "application/sdp", "not UTF-8"),
    (CHROMIUM_OFFER, "application/json", "not JSON"),
    (json.dumps({"type": "answer", "sdp": CHROMIUM_OFFER.decode()}).encode(), "application/json", "expected"),
    (json.dumps({"type": "offer", "sdp": 1}).encode(), "application/json", "expected"),
    (CHROMIUM_OFFER.replace(b"a=ice-pwd:", b"a=x-pwd:"), "application/sdp", "no ICE credentials"),
    (CHROMIUM_OFFER.replace(b"m=application", b"m=video"), "application/sdp", "only a data channel"),
])
def test_bad_offers_are_refused(body: bytes, ctype: str, why: str) -> None:
    with pytest.raises(SignalError, match=why):
        offer_of(body, ctype)


@pytest.mark.parametrize(("label", "target"), [
    ("tcp:10.0.0.1:80", Endpoint("10.0.0.1", 80)),
    ("tcp:[fd00::1]:443", Endpoint("fd00::1", 443)),
    ("tcp:example.com:8080", Endpoint("example.com", 8080)),
])
def test_labels_name_a_destination(label: str, target: Endpoint) -> None:
    assert target_of_label(label) == target


@pytest.mark.parametrize("label", ["", "ugate", "udp:10.0.0.1:53", "tcp:", "tcp:10.0.0.1", "tcp:10.0.0.1:0",
                                   "tcp:10.0.0.1:65536", "tcp:fd00::1:443", "tcp:a b:80", "tcp:" + "a" * 300 + ":1",
                                   '{":method":"CONNECT"}'])
def test_labels_naming_no_destination_are_refused(label: str) -> None:
    with pytest.raises(ClientProtocolError):
        target_of_label(label)


@budget(300)
@given(st.one_of(st.binary(max_size=3000),
                 st.integers(0, len(CHROMIUM_OFFER)).map(lambda n: CHROMIUM_OFFER[:n]),
                 st.tuples(st.integers(0, len(CHROMIUM_OFFER)), st.binary(max_size=200))
                 .map(lambda t: CHROMIUM_OFFER[:t[0]] + t[1])),
       st.sampled_from(CONTENT_TYPES))
def test_fuzz_offers_are_an_offer_or_a_signal_error(body: bytes, ctype: str) -> None:
    try:
        sdp, as_json = offer_of(body, ctype)
        assert isinstance(sdp, str) and isinstance(as_json, bool)
    except SignalError:
        pass


@budget(300)
@given(st.one_of(st.text(max_size=320), st.integers(0, 30).map(lambda n: "tcp:[fd00::1]:443"[:n])))
def test_fuzz_labels_are_a_destination_or_a_protocol_error(label: str) -> None:
    try:
        assert isinstance(target_of_label(label), Endpoint)
    except ClientProtocolError:
        pass


# -- the per-channel bounds, on a real socketpair ----------------------------------------------------

class _Channel(AsyncIOEventEmitter):
    """What BrowserChannel uses of aiortc's RTCDataChannel (its events, send, close), without an SCTP
    association under it: the bounds concern the socket side."""

    def __init__(self) -> None:
        super().__init__()
        self.label = "tcp:127.0.0.1:1"
        self.readyState = "open"
        self.bufferedAmount = 0
        self.bufferedAmountLowThreshold = 0
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.readyState = "closed"


def test_a_browser_sending_past_a_slow_upstream_is_cut() -> None:
    async def scenario() -> None:
        channel = _Channel()
        released: list[BrowserChannel] = []
        bridge = BrowserChannel(cast(RTCDataChannel, channel), released.append)
        ours, theirs = socket.socketpair()  # ``ours`` (the flow core's end) is never read: a stalled upstream
        ours.setblocking(False)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: bridge, theirs)
        bridge.flow_end = ours
        chunk = b"x" * 65536
        sent = 0
        while not bridge.closed:
            channel.emit("message", chunk)
            sent += len(chunk)
            assert sent < MAX_UPLOAD_BUFFER + (16 << 20), "never cut"
        assert sent > MAX_UPLOAD_BUFFER and released == [bridge] and channel.readyState == "closed"
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectionResetError):  # the flow core sees a reset, not a clean end
            while ours.recv(1 << 20):
                pass
        ours.close()

    asyncio.run(scenario())


def test_bytes_before_the_socket_is_attached_are_bounded() -> None:
    async def scenario() -> None:
        channel = _Channel()
        bridge = BrowserChannel(cast(RTCDataChannel, channel), lambda b: None)
        for _ in range(MAX_EARLY // 65536):
            channel.emit("message", b"y" * 65536)
        assert not bridge.closed and bridge.early_bytes == MAX_EARLY
        channel.emit("message", "z")  # text is bytes too (UTF-8)
        assert bridge.closed and bridge.early == [] and channel.readyState == "closed"

    asyncio.run(scenario())


def test_upstream_bytes_go_out_in_chunks_and_its_end_closes_the_channel() -> None:
    async def scenario() -> None:
        channel = _Channel()
        bridge = BrowserChannel(cast(RTCDataChannel, channel), lambda b: None)
        ours, theirs = socket.socketpair()
        await asyncio.get_running_loop().connect_accepted_socket(lambda: bridge, theirs)
        channel.emit("message", b"request")
        ours.sendall(b"a" * 40000)
        ours.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(5):
            while channel.readyState != "closed":
                await asyncio.sleep(0.01)
        assert b"".join(channel.sent) == b"a" * 40000 and max(map(len, channel.sent)) <= 16384
        assert ours.recv(100) == b"request"
        ours.close()

    asyncio.run(scenario())
