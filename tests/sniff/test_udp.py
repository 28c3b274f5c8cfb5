"""UDP sniffers: dig and openssl DTLS datagrams captured by scripts/capture_sniff_fixtures.py, the
RFC 5769 STUN sample request, a WireGuard initiation laid out per the whitepaper, and fuzzing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniff.classify import Sniffed, classify_datagrams
from sniff.result import NotThisProtocol
from sniff.udp import DnsQuery, Stun, WireGuard, parse_dns_query, parse_dtls_client_hello, parse_stun, parse_wireguard
from tests.fuzzing import budget

FIXTURES = Path(__file__).parent / "fixtures"
# RFC 5769 section 2.1, "Sample Request" (Binding request with SOFTWARE, PRIORITY, ICE-CONTROLLED,
# USERNAME, MESSAGE-INTEGRITY and FINGERPRINT)
STUN_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149a"
    "eaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf"
)
# type 1, 3 reserved zero bytes, sender index (little-endian), then ephemeral (32), encrypted static
# (48), encrypted timestamp (28), mac1 (16), mac2 (16): 148 bytes
WG_INITIATION = b"\x01\x00\x00\x00" + (0x1234).to_bytes(4, "little") + bytes(range(140))


@pytest.mark.parametrize(
    ("parse", "data", "expected"),
    [
        (parse_stun, STUN_REQUEST, Stun(1, "request", bytes.fromhex("b7e7a701bc34d686fa87dfae"))),
        (parse_wireguard, WG_INITIATION, WireGuard("initiation", 0x1234)),
        (parse_wireguard, b"\x04\x00\x00\x00" + bytes(12) + bytes(32), WireGuard("data", 0)),
    ],
)
def test_datagrams(parse: Callable[[bytes], Any], data: bytes, expected: Any) -> None:
    assert parse(data) == expected


def test_dig_query() -> None:
    query = parse_dns_query((FIXTURES / "dig_query.bin").read_bytes())
    assert isinstance(query, DnsQuery) and (query.name, query.qtype) == ("www.example.test", 28)


def test_dtls_client_hello_from_openssl() -> None:
    hello = parse_dtls_client_hello((FIXTURES / "openssl_dtls.bin").read_bytes())
    assert hello.sni == "dtls.example.test" and hello.legacy_version == 0xFEFD


@pytest.mark.parametrize(
    ("data", "protocol", "field", "value"),
    [
        (STUN_REQUEST, "stun", "detail", "request"),
        (WG_INITIATION, "wireguard", "detail", "initiation"),
        ((FIXTURES / "openssl_dtls.bin").read_bytes(), "dtls", "sni", "dtls.example.test"),
        ((FIXTURES / "dig_query.bin").read_bytes(), "dns", "host", "www.example.test"),
        (b"\x00" * 30, "unknown", "host", None),
    ],
)
def test_classify_datagram(data: bytes, protocol: str, field: str, value: Any) -> None:
    found = classify_datagrams([data])
    assert found.protocol == protocol and getattr(found, field) == value


@pytest.mark.parametrize("data", [STUN_REQUEST, WG_INITIATION, (FIXTURES / "dig_query.bin").read_bytes(),
                                  (FIXTURES / "openssl_dtls.bin").read_bytes()])
def test_truncations_are_not_mistaken(data: bytes) -> None:
    for cut in range(len(data) - 1):
        assert isinstance(classify_datagrams([data[:cut]]), Sniffed)  # never raises


@pytest.mark.parametrize("parse", [parse_stun, parse_dns_query, parse_wireguard, parse_dtls_client_hello])
@budget(300)
@given(data=st.binary(max_size=300))
def test_arbitrary_datagrams(parse: Callable[[bytes], Any], data: bytes) -> None:
    try:
        parse(data)
    except NotThisProtocol:
        pass


@pytest.mark.parametrize("length", [0, 1, 11])
def test_a_dtls_record_too_short_for_a_handshake_header_is_not_dtls(length: int) -> None:
    """An empty handshake record raised IndexError (found by scripts/fuzz_parsers.py, 122 inputs in)."""
    data = b"\x16\xfe\xff" + bytes(8) + length.to_bytes(2, "big") + bytes(length) + bytes(20)
    with pytest.raises(NotThisProtocol):
        parse_dtls_client_hello(data)
