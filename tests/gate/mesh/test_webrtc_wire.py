"""The WebRTC transport's pure codecs (gate.mesh.webrtc.wire) on descriptions aiortc wrote, table cases
and property fuzzing; and the answerer refusing bad offers before aiortc builds anything."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.addr import Endpoint
from gate.config import PeerSpec
from gate.errors import ClientProtocolError
from gate.mesh.transport import Exchanged, FlowMeta
from gate.mesh.webrtc.answerer import Answerer
from gate.mesh.webrtc.link import closed_all
from gate.mesh.webrtc.wire import (
    MAX_CANDIDATES,
    MAX_SIGNAL,
    Ack,
    Eof,
    Ok,
    Refused,
    Sdp,
    SignalError,
    SignalMessage,
    check_sdp,
    decode_signal,
    encode_signal,
    label_of,
    meta_of_label,
    parse_control,
)
from tests.fuzzing import budget

FIXTURES = Path(__file__).parent / "fixtures"
OFFER = (FIXTURES / "aiortc-1.16-offer.sdp").read_bytes().decode()  # CRLF lines, as written
ANSWER = (FIXTURES / "aiortc-1.16-answer.sdp").read_bytes().decode()
ID_A = "a" * 52
_META = FlowMeta(Endpoint("10.1.2.3", 443), Endpoint("192.0.2.7", 5555), "example.com")


def test_descriptions_aiortc_writes_pass_with_their_sha256_fingerprint() -> None:
    offer = check_sdp(OFFER)
    assert offer.fingerprint.startswith("CC:3E:80:F6") and len(offer.fingerprint) == 95 and offer.candidates == 2
    assert isinstance(check_sdp(ANSWER), Sdp)


@pytest.mark.parametrize(("change", "why"), [
    (lambda s: s.replace("m=application", "m=audio"), "only a data channel section"),
    (lambda s: s + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n", "2 media sections"),
    (lambda s: "\r\n".join(line for line in s.split("\r\n") if not line.startswith("m=")), "0 media sections"),
    (lambda s: "\r\n".join(line for line in s.split("\r\n") if not line.startswith("a=fingerprint:sha-256")),
     "0 distinct sha-256"),
    (lambda s: s + "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n", "2 distinct sha-256"),
    (lambda s: s + "a=fingerprint:sha-1 " + ":".join(["AB"] * 20) + "\r\n", "not sha-256"),
    (lambda s: s + "a=fingerprint:sha-256 AB:CD\r\n", "not sha-256"),
    (lambda s: s.replace("a=ice-pwd:", "a=x-pwd:"), "no ICE credentials"),
    (lambda s: s + "a=candidate:1 1 udp 1 192.0.2.9 9 typ host\r\n" * MAX_CANDIDATES, r"candidates \(at most"),
])
def test_descriptions_we_do_not_serve_are_refused(change: object, why: str) -> None:
    with pytest.raises(SignalError, match=why):
        check_sdp(change(OFFER))  # type: ignore[operator]


def test_signal_messages_round_trip_and_garbage_is_refused() -> None:
    offer = SignalMessage(gate=ID_A, sdp=OFFER)
    assert decode_signal(encode_signal(offer)) == offer
    assert decode_signal(encode_signal(SignalMessage(error="no"))) == SignalMessage(error="no")
    for bad in (b"", b"\xff\xfe", b"[]", b'{"v": 2, "gate": "a", "sdp": "b"}', b'{"v": 1}', b'{"v": 1, "gate": 1}',
                b'{"v": 1, "error": 5}', b'{"v": 1, "gate": "", "sdp": "x"}', b"x" * (MAX_SIGNAL + 1)):
        with pytest.raises(SignalError):
            decode_signal(bad)


def test_flow_metadata_travels_in_the_label_as_the_h2_headers_carry_it() -> None:
    meta = FlowMeta(Endpoint("10.1.2.3", 443), Endpoint("192.0.2.7", 5555), "example.com", "tls", "example.com",
                    ("h2", "http/1.1"), True, 2)
    assert meta_of_label(label_of(meta)) == meta
    for bad in ("", "{", "[]", '{"a": 1}', '{":method": "GET"}', "x" * 5000):
        with pytest.raises(ClientProtocolError):
            meta_of_label(bad)


def test_control_messages() -> None:
    assert parse_control("ok") == Ok() and parse_control("eof") == Eof()
    assert parse_control("ack 1048576") == Ack(1048576)
    assert parse_control("err 403 rejected") == Refused("403", "rejected")
    for bad in ("", "ok ", "ack", "ack -1", "ack 99999999999", "ack ٣", "err 4x3 no", "hello", "eof" * 30):
        with pytest.raises(ClientProtocolError):
            parse_control(bad)


@budget(300)
@given(st.binary(max_size=2048))
def test_fuzz_signal_is_a_message_or_a_signal_error(data: bytes) -> None:
    try:
        assert isinstance(decode_signal(data), SignalMessage)
    except SignalError:
        pass


@budget(200)
@given(st.integers(0, len(OFFER)), st.text(max_size=200))
def test_fuzz_truncated_or_extended_descriptions_pass_or_are_refused(cut: int, tail: str) -> None:
    try:
        assert isinstance(check_sdp(OFFER[:cut] + tail), Sdp)
    except SignalError:
        pass


@budget(300)
@given(st.text(max_size=100))
def test_fuzz_control_is_a_control_or_a_protocol_error(text: str) -> None:
    try:
        assert isinstance(parse_control(text), Ok | Refused | Eof | Ack)
    except ClientProtocolError:
        pass


@budget(300)
@given(st.one_of(st.text(max_size=300), st.integers(0, 400).map(lambda n: label_of(_META)[:n])))
def test_fuzz_labels_are_a_flow_or_a_protocol_error(label: str) -> None:
    try:
        assert isinstance(meta_of_label(label), FlowMeta)
    except ClientProtocolError:
        pass


def test_the_answerer_refuses_bad_offers_and_keeps_nothing() -> None:
    offered = PeerSpec(name="a", transports=("webrtc", "h2"))
    h2_only = PeerSpec(name="a")

    def serve(*_args: object) -> object:
        raise AssertionError("no flow may be served")

    async def scenario() -> list[str]:
        answerer = Answerer("b" * 52, 5.0)
        good = encode_signal(SignalMessage(gate=ID_A, sdp=OFFER))
        cases = [
            (ID_A, None, good),  # a gate that is no configured peer
            (ID_A, h2_only, good),  # a peer we do not offer webrtc
            (ID_A, offered, b"\x00garbage"),
            (ID_A, offered, encode_signal(SignalMessage(gate=ID_A, sdp="v=0\r\n"))),
            ("c" * 52, offered, good),  # the offer names another gate than the tunnel's
            (ID_A, offered, encode_signal(SignalMessage(gate=ID_A, sdp=OFFER.replace("a=setup:actpass",
                                                                                     "a=setup:bogus")))),
        ]
        errors = []
        for ident, peer, body in cases:
            sender = Exchanged("webrtc", ident, peer)
            answer = decode_signal(await answerer.answer(serve, sender, body))  # type: ignore[arg-type]
            errors.append(answer.error)
        assert not answerer.links
        sender = Exchanged("webrtc", ID_A, offered)
        parallel = await asyncio.gather(*(answerer.answer(serve, sender, good)  # type: ignore[arg-type]
                                          for _ in range(5)))
        refused = [decode_signal(a).error for a in parallel if decode_signal(a).error]
        assert refused == ["another offer from this gate is being answered"] * 4  # one answered, one link
        assert len(answerer.links) == 1
        answerer.close()
        await closed_all()
        return errors

    errors = asyncio.run(scenario())
    assert errors[0] == errors[1] == "webrtc is not offered to this gate"
    assert errors[2].startswith("bad offer: ") and errors[3].startswith("bad offer: ")
    assert errors[4] == f"offer names gate {ID_A}, the tunnel is gate {'c' * 52}"
    assert errors[5].startswith("offer not accepted"), errors[5]
