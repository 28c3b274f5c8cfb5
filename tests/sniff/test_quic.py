"""QUIC Initial decryption on datagrams captured from aioquic's client (v1, v2, and a ClientHello big
enough to be split over two datagrams) and from Chromium (whose hello is split), plus fuzzing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniff.classify import Sniffed, classify_datagrams
from sniff.quic import parse_quic_initial
from sniff.result import NEED_MORE, NotThisProtocol
from sniff.tls import ClientHello
from tests.fuzzing import budget

FIXTURES = Path(__file__).parent / "fixtures"


def datagrams(name: str) -> list[bytes]:
    data, out, pos = (FIXTURES / name).read_bytes(), [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos : pos + 2], "big")
        out.append(data[pos + 2 : pos + 2 + size])
        pos += 2 + size
    return out


@pytest.mark.parametrize("name", ["aioquic_initial.bin", "aioquic_initial_v2.bin"])
def test_one_datagram_hello(name: str) -> None:
    hello = parse_quic_initial(datagrams(name)[:1])
    assert isinstance(hello, ClientHello) and hello.sni == "quic.example.test" and hello.alpn == ("h3",)
    assert 0x0304 in hello.versions


def test_hello_split_over_two_datagrams() -> None:
    first, second = datagrams("aioquic_initial_split.bin")[:2]
    assert parse_quic_initial([first]) is NEED_MORE
    hello = parse_quic_initial([first, second])
    assert isinstance(hello, ClientHello) and hello.sni == "quic.example.test"
    assert len(hello.alpn) == 61 and hello.consumed == 2
    assert classify_datagrams([first]) is NEED_MORE  # the name is in the second datagram
    found = classify_datagrams([first, second])
    assert isinstance(found, Sniffed) and (found.protocol, found.sni) == ("quic", "quic.example.test")


def test_chromium_splits_its_hello_over_two_datagrams() -> None:
    """Chromium 156's first flight (scripts/capture_sniff_fixtures.py): three 1250-byte Initials, the
    ClientHello (with a post-quantum key share) in the first two."""
    sent = datagrams("chromium_quic_initial.bin")
    assert [len(d) for d in sent] == [1250, 1250, 1250]
    assert classify_datagrams(sent[:1]) is NEED_MORE
    for count in (2, 3):
        found = classify_datagrams(sent[:count])
        assert found == Sniffed("quic", sni="www.example.test", alpn=("h3",), host="www.example.test", ech=True)


def test_a_hello_that_never_ends_is_still_quic() -> None:
    first = datagrams("aioquic_initial_split.bin")[0]
    assert classify_datagrams([first] * 7) is NEED_MORE  # the same piece again adds nothing
    assert classify_datagrams([first] * 8) == Sniffed("quic")  # sniff.quic.MAX_DATAGRAMS: routed without a name


def test_classify_quic() -> None:
    found = classify_datagrams(datagrams("aioquic_initial.bin")[:1])
    assert isinstance(found, Sniffed)
    assert (found.protocol, found.sni, found.alpn) == ("quic", "quic.example.test", ("h3",))


def test_truncated_or_flipped_initials_are_refused() -> None:
    packet = datagrams("aioquic_initial.bin")[0]
    for cut in (10, 60, 100, 250):  # inside the Initial packet (the datagram is padded after it)
        with pytest.raises(NotThisProtocol):
            parse_quic_initial([packet[:cut]])
    flipped = bytearray(packet)
    flipped[150] ^= 1  # inside the encrypted payload: the AEAD tag no longer matches
    with pytest.raises(NotThisProtocol):
        parse_quic_initial([bytes(flipped)])


@budget(200)
@given(data=st.binary(max_size=1300), cut=st.integers(0, 1200))
def test_arbitrary_input_only_three_outcomes(data: bytes, cut: int) -> None:
    packet = datagrams("aioquic_initial.bin")[0]
    for candidate in (data, packet[:cut] + data, b"\xc0\x00\x00\x00\x01" + data):
        try:
            result = parse_quic_initial([candidate])
        except NotThisProtocol:
            continue
        assert result is NEED_MORE or isinstance(result, ClientHello)


@budget(200)
@given(cut=st.integers(0, 1250), junk=st.binary(max_size=200))
def test_a_damaged_second_datagram_only_three_outcomes(cut: int, junk: bytes) -> None:
    first, second = datagrams("chromium_quic_initial.bin")[:2]
    try:
        result = parse_quic_initial([first, second[:cut] + junk])
    except NotThisProtocol:
        return
    assert result is NEED_MORE or isinstance(result, ClientHello)
