"""RFC 7983 demultiplexing of the shared port: STUN (cookie), WireGuard (type + size), anything else."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from gate.wireguard.demux import Datagram, classify
from tests.fuzzing import budget

# A Binding request as aioice sends it (header only) and RFC 5769's sample request
BINDING = bytes.fromhex("000100002112a442") + os.urandom(12)
RFC5769 = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e2074657374"
    "20636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576"
    "746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571"
    "a280280004e57a3bcf")


def wireguard(kind: int, size: int) -> bytes:
    return bytes([kind, 0, 0, 0]) + os.urandom(size - 4)


def test_table() -> None:
    assert classify(BINDING) == Datagram.STUN
    assert classify(RFC5769) == Datagram.STUN
    assert classify(wireguard(1, 148)) == Datagram.WIREGUARD  # handshake initiation
    assert classify(wireguard(2, 92)) == Datagram.WIREGUARD  # response
    assert classify(wireguard(3, 64)) == Datagram.WIREGUARD  # cookie reply
    assert classify(wireguard(4, 32)) == Datagram.WIREGUARD  # keepalive (empty data)
    assert classify(wireguard(4, 1452)) == Datagram.WIREGUARD
    assert classify(wireguard(1, 149)) == Datagram.OTHER  # wrong size for its type
    assert classify(wireguard(4, 31)) == Datagram.OTHER
    assert classify(bytes([22, 254, 253]) + os.urandom(40)) == Datagram.OTHER  # DTLS (20..63)
    assert classify(bytes([0x80]) + os.urandom(40)) == Datagram.OTHER  # RTP
    assert classify(b"") == Datagram.OTHER
    assert classify(BINDING[:19]) == Datagram.OTHER  # shorter than a STUN header


@budget(2000)
@given(st.binary(max_size=200))
def test_any_bytes_get_one_of_the_three(data: bytes) -> None:
    kind = classify(data)
    assert isinstance(kind, Datagram)
    if kind == Datagram.STUN:  # the cookie is what the kernel rule of mode 3 keys on: the two must agree
        assert data[4:8] == b"\x21\x12\xa4\x42" and data[0] <= 3
    if data[4:8] != b"\x21\x12\xa4\x42":
        assert kind != Datagram.STUN


@budget(500)
@given(st.sampled_from([BINDING, RFC5769, wireguard(1, 148), wireguard(4, 200)]), st.data())
def test_truncations_and_suffixes_never_cross_over(whole: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(whole)))
    suffix = data.draw(st.binary(max_size=8))
    for piece in (whole[:cut], whole + suffix):
        kind = classify(piece)
        assert kind in (classify(whole), Datagram.OTHER)
