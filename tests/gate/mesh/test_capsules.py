"""The capsule codec (RFC 9297 / RFC 9298): table-driven cases from the RFCs' encodings, and property
fuzzing: every truncation of a valid stream, random suffixes, byte-at-a-time feeding. The only outcomes
allowed are a capsule, NEED_MORE, or CapsuleError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.mesh.capsules import (
    MAX_CAPSULE,
    MAX_UDP_PAYLOAD,
    Capsule,
    CapsuleError,
    CapsuleReader,
    datagram_capsule,
    datagram_payload,
    encode_varint,
    pull_capsule,
    pull_varint,
)
from sniff.result import NEED_MORE, NeedMore
from tests.fuzzing import budget


@pytest.mark.parametrize(("value", "wire"), [  # RFC 9000 appendix A.1's examples
    (37, bytes.fromhex("25")),
    (15293, bytes.fromhex("7bbd")),
    (494878333, bytes.fromhex("9d7f3e7d")),
    (151288809941952652, bytes.fromhex("c2197c5eff14e88c")),
])
def test_varints_as_rfc_9000_spells_them(value: int, wire: bytes) -> None:
    assert pull_varint(wire, 0) == (value, len(wire))
    assert encode_varint(value) == wire
    assert pull_varint(wire[:-1], 0) is NEED_MORE


def test_non_shortest_varints_are_read() -> None:
    assert pull_varint(bytes.fromhex("4025"), 0) == (37, 2)  # RFC 9000: not necessarily minimal


def test_encode_varint_bounds() -> None:
    assert encode_varint((1 << 62) - 1) == b"\xff" * 8
    with pytest.raises(ValueError):
        encode_varint(1 << 62)


def test_a_datagram_capsule_round_trips() -> None:
    wire = datagram_capsule(b"hello")
    assert wire == b"\x00\x06\x00hello"  # type 0, length 6, context id 0, payload
    found = pull_capsule(wire)
    assert found == (Capsule(0, b"\x00hello"), len(wire))
    assert not isinstance(found, NeedMore)
    assert datagram_payload(found[0]) == b"hello"


def test_the_largest_udp_payload_fits_and_one_byte_more_of_capsule_does_not() -> None:
    wire = datagram_capsule(bytes(MAX_UDP_PAYLOAD))
    assert CapsuleReader().feed(wire) == [bytes(MAX_UDP_PAYLOAD)]
    with pytest.raises(CapsuleError):
        pull_capsule(encode_varint(0) + encode_varint(MAX_CAPSULE + 1))  # refused before the value comes


def test_unknown_types_and_contexts_are_skipped_and_a_bare_datagram_is_an_error() -> None:
    assert datagram_payload(Capsule(0x2A, b"abc")) is None
    assert datagram_payload(Capsule(0, b"\x02abc")) is None
    with pytest.raises(CapsuleError):
        datagram_payload(Capsule(0, b""))
    wire = encode_varint(0x2A) + encode_varint(3) + b"abc" + datagram_capsule(b"x") + b"\x00\x02\x02y"
    assert CapsuleReader().feed(wire) == [b"x"]


def test_the_reader_holds_one_partial_capsule_at_most() -> None:
    reader = CapsuleReader()
    wire = datagram_capsule(b"a" * 1000)
    assert reader.feed(wire + wire[:500]) == [b"a" * 1000]
    assert len(reader.buffer) == 500
    assert reader.feed(wire[500:]) == [b"a" * 1000] and not reader.buffer


payloads = st.lists(st.binary(max_size=300), max_size=6)
capsule_streams = st.lists(
    st.one_of(payloads.map(lambda ps: [("d", p) for p in ps]),
              st.tuples(st.integers(1, (1 << 62) - 1), st.binary(max_size=50)).map(lambda t: [("u", t)])),
    max_size=4).map(lambda groups: [item for group in groups for item in group])


def _wire(items: list[tuple[str, object]]) -> tuple[bytes, list[bytes]]:
    wire, expected = b"", []
    for kind, item in items:
        if kind == "d":
            assert isinstance(item, bytes)
            wire += datagram_capsule(item)
            expected.append(item)
        else:
            assert isinstance(item, tuple)
            ctype, value = item
            wire += encode_varint(ctype) + encode_varint(len(value)) + value
    return wire, expected


@budget(300)
@given(capsule_streams)
def test_every_truncation_is_need_more_or_whole_capsules(items: list[tuple[str, object]]) -> None:
    wire, expected = _wire(items)
    for cut in range(len(wire) + 1):
        pos, count = 0, 0
        while True:
            found = pull_capsule(wire[:cut], pos)
            if isinstance(found, NeedMore):
                break
            assert isinstance(found[0], Capsule)
            pos = found[1]
            count += 1
        assert pos <= cut
    assert CapsuleReader().feed(wire) == expected


@budget(300)
@given(capsule_streams, st.data())
def test_byte_at_a_time_and_random_splits_give_the_same_datagrams(items: list[tuple[str, object]],
                                                                  data: st.DataObject) -> None:
    wire, expected = _wire(items)
    reader, got = CapsuleReader(), []
    for i in range(len(wire)):
        got += reader.feed(wire[i:i + 1])
    assert got == expected and not reader.buffer
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    reader, got, last = CapsuleReader(), [], 0
    for cut in [*cuts, len(wire)]:
        got += reader.feed(wire[last:cut])
        last = cut
    assert got == expected


@budget(500)
@given(capsule_streams, st.binary(max_size=64))
def test_random_suffixes_give_payloads_or_capsule_error(items: list[tuple[str, object]], suffix: bytes) -> None:
    wire, expected = _wire(items)
    reader = CapsuleReader()
    try:
        got = reader.feed(wire + suffix)
    except CapsuleError:
        return
    assert all(isinstance(p, bytes) for p in got)
    assert got[:len(expected)] == expected
    assert len(reader.buffer) <= MAX_CAPSULE + 16


@budget(500)
@given(st.binary(max_size=200))
def test_garbage_gives_need_more_a_capsule_or_capsule_error(data: bytes) -> None:
    try:
        found = pull_capsule(data)
    except CapsuleError:
        return
    assert found is NEED_MORE or (isinstance(found, tuple) and isinstance(found[0], Capsule))
