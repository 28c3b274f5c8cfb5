"""PROXY protocol headers: the spec's examples, HAProxy-built round trips, and fuzzing."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniff.proxy_protocol import TLV_HOPS, V2_SIGNATURE, ProxyHeader, build_v1, build_v2, parse_proxy_header
from sniff.result import NEED_MORE, NotThisProtocol
from tests.fuzzing import budget

CASES: list[tuple[bytes, Any]] = [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /", ProxyHeader(("192.168.0.1", 56324),
                                                                          ("192.168.0.11", 443), 47)),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", ProxyHeader(("2001:db8::1", 1), ("2001:db8::2", 65535), 44)),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(None, None, 15)),
    (build_v2(("10.0.0.1", 1234), ("10.0.0.2", 443)), ProxyHeader(("10.0.0.1", 1234), ("10.0.0.2", 443), 28)),
    (build_v2(("fd00::1", 5), ("fd00::2", 6)), ProxyHeader(("fd00::1", 5), ("fd00::2", 6), 52)),
    (b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00", ProxyHeader(None, None, 16)),  # v2 LOCAL (health check)
]


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_headers(data: bytes, expected: ProxyHeader) -> None:
    assert parse_proxy_header(data) == expected
    for cut in range(expected.consumed):
        assert parse_proxy_header(data[:cut]) is NEED_MORE


def test_v1_builder_round_trips() -> None:
    header = build_v1(("10.1.2.3", 40000), ("10.9.9.9", 80))
    assert header == b"PROXY TCP4 10.1.2.3 10.9.9.9 40000 80\r\n"
    assert parse_proxy_header(header) == ProxyHeader(("10.1.2.3", 40000), ("10.9.9.9", 80), len(header))


@pytest.mark.parametrize("data", [b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", b"PROXY TCP4 x y 1 2\r\n",
                                  b"PROXY TCP4 1.2.3.4 1.2.3.5 99999 2\r\n", b"PROXY " + b"A" * 120,
                                  b"GET / HTTP/1.1\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12)])
def test_bad_headers(data: bytes) -> None:
    with pytest.raises(NotThisProtocol):
        parse_proxy_header(data)


@budget(300)
@given(data=st.binary(max_size=200) | st.builds(lambda b: b"PROXY " + b, st.binary(max_size=120))
       | st.builds(lambda b: b"\r\n\r\n\x00\r\nQUIT\n" + b, st.binary(max_size=120)))
def test_arbitrary_input(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except NotThisProtocol:
        return
    assert result is NEED_MORE or isinstance(result, ProxyHeader)


@pytest.mark.parametrize("hops", [0, 1, 7, 255])
def test_v2_carries_the_hop_count(hops: int) -> None:
    header = build_v2(("10.1.2.3", 40000), ("10.9.9.9", 80), hops)
    assert parse_proxy_header(header + b"data") == ProxyHeader(("10.1.2.3", 40000), ("10.9.9.9", 80), len(header),
                                                               hops)


def test_other_tlvs_are_skipped_and_a_broken_tlv_list_means_no_hops() -> None:
    block = socket.inet_aton("10.0.0.1") + socket.inet_aton("10.0.0.2") + b"\x00\x01\x00\x02"
    tlvs = b"\x01\x00\x02h2" + bytes([TLV_HOPS, 0, 1, 3])  # ALPN first, then ours
    header = V2_SIGNATURE + b"\x21\x11" + len(block + tlvs).to_bytes(2, "big") + block + tlvs
    assert parse_proxy_header(header).hops == 3  # type: ignore[union-attr]
    broken = b"\x01\x00\x09h2" + bytes([TLV_HOPS, 0, 1, 3])  # the first TLV claims more than there is
    header = V2_SIGNATURE + b"\x21\x11" + len(block + broken).to_bytes(2, "big") + block + broken
    assert parse_proxy_header(header).hops == 0  # type: ignore[union-attr]
