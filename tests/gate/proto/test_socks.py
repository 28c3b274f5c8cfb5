"""SOCKS codec: real client bytes, every error path, and property fuzzing (truncations, suffixes,
byte-at-a-time feeding, arbitrary input: only a message, NEED_MORE or SocksError may come out)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.proto.socks import (
    NEED_MORE,
    Credentials,
    Greeting,
    Reply,
    Socks4Request,
    Socks5Request,
    SocksError,
    auth_reply,
    method_reply,
    parse_credentials,
    parse_first,
    parse_request,
    socks4_reply,
    socks5_reply,
)
from tests.fuzzing import budget

# Captured from curl 7.88 (Debian 12) against a socket that printed what it received.
CURL_SOCKS5_GREETING = b"\x05\x02\x00\x01"  # curl --socks5-hostname: no-auth, GSSAPI
CURL_SOCKS5_USERPASS_GREETING = b"\x05\x03\x00\x01\x02"  # curl --socks5-hostname user:pw@...
CURL_SOCKS5_HOSTNAME = b"\x05\x01\x00\x03\x0bexample.com\x00\x50"
CURL_SOCKS5_IPV4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90"
CURL_SOCKS4A = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00example.com\x00"
CURL_SOCKS4 = b"\x04\x01\x1f\x90\x7f\x00\x00\x01\x00"
CURL_CREDENTIALS = b"\x01\x05alice\x06s3cret"
IPV6_REQUEST = b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x01\xbb"

Parser = Callable[[bytes], Any]
VALID: list[tuple[Parser, bytes, Any]] = [
    (parse_first, CURL_SOCKS5_GREETING, Greeting(5, (0, 1), 4)),
    (parse_first, CURL_SOCKS5_USERPASS_GREETING, Greeting(5, (0, 1, 2), 5)),
    (parse_first, CURL_SOCKS4A, Socks4Request("example.com", 80, "", 21)),
    (parse_first, CURL_SOCKS4, Socks4Request("127.0.0.1", 8080, "", 9)),
    (parse_first, b"\x04\x01\x00\x50\x0a\x00\x00\x01bob\x00", Socks4Request("10.0.0.1", 80, "bob", 12)),
    (parse_request, CURL_SOCKS5_HOSTNAME, Socks5Request(1, "example.com", 80, 3, 18)),
    (parse_request, CURL_SOCKS5_IPV4, Socks5Request(1, "127.0.0.1", 8080, 1, 10)),
    (parse_request, IPV6_REQUEST, Socks5Request(1, "::1", 443, 4, 22)),
    (parse_credentials, CURL_CREDENTIALS, Credentials("alice", "s3cret", 14)),
    (parse_credentials, b"\x01\x00\x00", Credentials("", "", 3)),
]
IDS = [f"{p.__name__}-{i}" for i, (p, _, _) in enumerate(VALID)]


@pytest.mark.parametrize(("parse", "data", "expected"), VALID, ids=IDS)
def test_real_client_bytes(parse: Parser, data: bytes, expected: Any) -> None:
    assert parse(data) == expected


@pytest.mark.parametrize(("parse", "data", "expected"), VALID, ids=IDS)
def test_every_truncation_needs_more(parse: Parser, data: bytes, expected: Any) -> None:
    for cut in range(len(data)):
        assert parse(data[:cut]) is NEED_MORE, cut


@pytest.mark.parametrize(("parse", "data", "expected"), VALID, ids=IDS)
@budget(100)
@given(suffix=st.binary(max_size=64))
def test_suffix_does_not_change_the_message(parse: Parser, data: bytes, expected: Any, suffix: bytes) -> None:
    assert parse(data + suffix) == expected


@pytest.mark.parametrize(
    ("parse", "data", "reply"),
    [
        (parse_first, b"\x05\x00", method_reply(0xFF)),  # no methods offered
        (parse_first, b"G", None),  # not SOCKS at all (an HTTP client)
        (parse_first, b"\x04\x02\x00\x50\x01\x02\x03\x04\x00", socks4_reply(False)),  # SOCKS4 BIND
        (parse_first, b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 256, socks4_reply(False)),  # no NUL
        (parse_first, b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", socks4_reply(False)),  # empty 4a name
        (parse_first, b"\x04\x01\x00\x50\x01\x02\x03\x04\xff\x00", socks4_reply(False)),  # user not UTF-8
        (parse_request, b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", socks5_reply(Reply.COMMAND_NOT_SUPPORTED)),
        (parse_request, b"\x05\x04\x00\x01\x7f\x00\x00\x01\x00\x50", socks5_reply(Reply.COMMAND_NOT_SUPPORTED)),
        (parse_request, b"\x05\x01\x00\x09", socks5_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED)),
        (parse_request, b"\x04\x01\x00\x01", socks5_reply(Reply.GENERAL_FAILURE)),
        (parse_request, b"\x05\x01\x00\x03\x00\x00\x50", socks5_reply(Reply.GENERAL_FAILURE)),  # empty name
        (parse_request, b"\x05\x01\x00\x03\x02a\nb\x00\x50", socks5_reply(Reply.GENERAL_FAILURE)),  # control char
        (parse_credentials, b"\x02\x01a\x01b", auth_reply(False)),
    ],
)
def test_errors_carry_the_protocol_reply(parse: Parser, data: bytes, reply: bytes | None) -> None:
    with pytest.raises(SocksError) as e:
        parse(data)
    assert e.value.reply == reply


@pytest.mark.parametrize("parse", [parse_first, parse_request, parse_credentials])
@budget(300)
@given(data=st.binary(max_size=600))
def test_arbitrary_input_only_has_three_outcomes(parse: Parser, data: bytes) -> None:
    try:
        result = parse(data)
    except SocksError:
        return
    assert result is NEED_MORE or 0 < result.consumed <= len(data)


@pytest.mark.parametrize(("parse", "data", "expected"), VALID, ids=IDS)
def test_byte_at_a_time_reaches_the_message_exactly_at_its_end(parse: Parser, data: bytes, expected: Any) -> None:
    buf = b""
    for i, byte in enumerate(data):
        buf += bytes([byte])
        result = parse(buf)
        assert (result == expected) if i == len(data) - 1 else (result is NEED_MORE)


@budget(200)
@given(host=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}\.){0,3}[a-z]{2,6}", fullmatch=True), port=st.integers(1, 65535))
def test_domain_requests_round_trip(host: str, port: int) -> None:
    data = bytes([5, 1, 0, 3, len(host)]) + host.encode() + port.to_bytes(2, "big")
    assert parse_request(data) == Socks5Request(1, host, port, 3, len(data))


def test_replies() -> None:
    assert socks5_reply(Reply.SUCCEEDED, "10.1.2.3", 1080) == b"\x05\x00\x00\x01\x0a\x01\x02\x03\x04\x38"
    assert socks5_reply(Reply.HOST_UNREACHABLE, "::1", 443) == b"\x05\x04\x00\x04" + bytes(15) + b"\x01\x01\xbb"
    assert socks4_reply(True) == b"\x00\x5a" + bytes(6)
    assert method_reply(2) == b"\x05\x02" and auth_reply(True) == b"\x01\x00"
