"""SOCKS UDP header codec: real client bytes (PySocks, Dante), every malformed form, and property fuzzing
(every truncation, random suffixes land in the payload, arbitrary input: only a datagram or the error)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.proto.socks_udp import HEADER_MAX, SocksDatagram, SocksUdpError, header, parse_datagram
from tests.fuzzing import budget

# As PySocks 1.7.1 writes them (socks.py: sendto and _write_SOCKS5_address; rdns=True, its default, sends
# names as names): socksocket(SOCK_DGRAM).sendto(b"hello", ("127.0.0.1", 5353)) and ("localhost", 5353).
PYSOCKS_V4 = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x14\xe9hello"
PYSOCKS_DOMAIN = b"\x00\x00\x00\x03\x09localhost\x14\xe9hello"
IPV6 = b"\x00\x00\x00\x04" + bytes(15) + b"\x01" + b"\x00\x35" + b"q"
EMPTY_PAYLOAD = b"\x00\x00\x00\x01\x0a\x00\x00\x01\x00\x35"

VALID = [
    (PYSOCKS_V4, SocksDatagram("127.0.0.1", 5353, 1, 0, b"hello")),
    (PYSOCKS_DOMAIN, SocksDatagram("localhost", 5353, 3, 0, b"hello")),
    (IPV6, SocksDatagram("::1", 53, 4, 0, b"q")),
    (EMPTY_PAYLOAD, SocksDatagram("10.0.0.1", 53, 1, 0, b"")),
    (b"\x00\x00\x01" + EMPTY_PAYLOAD[3:], SocksDatagram("10.0.0.1", 53, 1, 1, b"")),  # a fragment parses
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_real_client_bytes(data: bytes, expected: SocksDatagram) -> None:
    assert parse_datagram(data) == expected


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_header_round_trip(data: bytes, expected: SocksDatagram) -> None:
    if expected.frag == 0:
        assert header(expected.host, expected.port) + expected.data == data


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_every_truncation_inside_the_header_is_an_error(data: bytes, expected: SocksDatagram) -> None:
    cut_at = len(data) - len(expected.data)
    for cut in range(cut_at):
        with pytest.raises(SocksUdpError):
            parse_datagram(data[:cut])


@pytest.mark.parametrize(("data", "expected"), VALID)
@budget(100)
@given(suffix=st.binary(max_size=64))
def test_a_suffix_is_payload(data: bytes, expected: SocksDatagram, suffix: bytes) -> None:
    got = parse_datagram(data + suffix)
    assert got.data == expected.data + suffix and got.host == expected.host and got.port == expected.port


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x00\x00\x01\x7f\x00\x00\x01\x00\x35",  # RSV not zero
        b"\x00\x00\x00\x09\x7f\x00\x00\x01\x00\x35",  # unknown ATYP
        b"\x00\x00\x00\x03\x00\x00\x35",  # empty domain
        b"\x00\x00\x00\x03\x02a\n\x00\x35",  # a control character in the domain
        b"\x00\x00\x00\x03\x02\xff\xfe\x00\x35",  # not UTF-8
        b"\x05\x01\x00",  # a TCP handshake sent to the UDP port
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(SocksUdpError):
        parse_datagram(data)


@budget(500)
@given(data=st.binary(max_size=400))
def test_arbitrary_input_only_has_two_outcomes(data: bytes) -> None:
    try:
        got = parse_datagram(data)
    except SocksUdpError:
        return
    assert isinstance(got, SocksDatagram)
    assert 4 + 4 + 2 <= len(data) - len(got.data) <= HEADER_MAX
    assert data.endswith(got.data)


@budget(300)
@given(host=st.one_of(st.ip_addresses().map(str),
                      st.from_regex(r"[a-z0-9]([a-z0-9-]{0,30}\.){0,5}[a-z]{2,6}", fullmatch=True)),
       port=st.integers(0, 65535), data=st.binary(max_size=64))
def test_built_headers_parse_back(host: str, port: int, data: bytes) -> None:
    got = parse_datagram(header(host, port) + data)
    assert (got.host, got.port, got.frag, got.data) == (host, port, 0, data)
    assert len(header(host, port)) <= HEADER_MAX


def test_a_name_too_long_for_a_header() -> None:
    with pytest.raises(SocksUdpError):
        header("a" * 256, 53)
