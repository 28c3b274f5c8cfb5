"""STUN Binding answers, checked with aioice's STUN codec (an independent implementation: the one the
aiortc ICE agent runs), on RFC 5769's sample request, and fuzzed."""

from __future__ import annotations

import aioice.stun as stun
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.proto.stun import binding_response
from tests.fuzzing import budget

# RFC 5769 section 2.1: a Binding request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME, integrity
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149a"
    "eaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf")


@pytest.mark.parametrize(("host", "port"), [("192.0.2.1", 32853), ("2001:db8:1234:5678:11:2233:4455:6677", 1)])
def test_a_binding_request_gets_the_requesters_address(host: str, port: int) -> None:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    answer = stun.parse_message(binding_response(bytes(request), host, port))  # checks the FINGERPRINT too
    assert (answer.message_method, answer.message_class) == (stun.Method.BINDING, stun.Class.RESPONSE)
    assert answer.transaction_id == request.transaction_id
    assert answer.attributes["XOR-MAPPED-ADDRESS"] == (host, port)


def test_the_rfc5769_sample_request_is_answered_whatever_its_attributes() -> None:
    answer = stun.parse_message(binding_response(RFC5769_REQUEST, "192.0.2.1", 32853))
    assert answer.transaction_id == RFC5769_REQUEST[8:20]
    assert answer.attributes["XOR-MAPPED-ADDRESS"] == ("192.0.2.1", 32853)


@pytest.mark.parametrize("message", [
    stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.INDICATION),
    stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE),
    stun.Message(message_method=stun.Method.ALLOCATE, message_class=stun.Class.REQUEST),
], ids=["indication", "response", "allocate"])
def test_only_binding_requests_are_answered(message: stun.Message) -> None:
    assert binding_response(bytes(message), "192.0.2.1", 1) is None


@pytest.mark.parametrize("data", [b"", b"\x00\x01\x00\x00", RFC5769_REQUEST[:-1], RFC5769_REQUEST + b"\x00",
                                  b"\x01" + RFC5769_REQUEST[1:]])
def test_truncated_padded_and_foreign_bytes_get_nothing(data: bytes) -> None:
    assert binding_response(data, "192.0.2.1", 1) is None


@budget(300)
@given(data=st.binary(max_size=200) | st.builds(lambda b: RFC5769_REQUEST[:20] + b, st.binary(max_size=60)),
       v6=st.booleans(), port=st.integers(0, 65535))
def test_any_datagram_gets_nothing_or_a_valid_answer(data: bytes, v6: bool, port: int) -> None:
    host = "2001:db8::1" if v6 else "198.51.100.7"
    answer = binding_response(data, host, port)
    if answer is not None:
        assert len(answer) <= 20 + 24 + 8  # never much more than the smallest request
        parsed = stun.parse_message(answer)
        assert parsed.attributes["XOR-MAPPED-ADDRESS"] == (host, port)
