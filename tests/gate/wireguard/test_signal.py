"""The WireGuard signalling message: round trip, bounds, and hypothesis over truncations and junk."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.wireguard.signal import MAX_CANDIDATES, MAX_MESSAGE, Signal, SignalError, decode, encode
from tests.fuzzing import budget

GATE_ID = "73tlqhtrwjbvyqqp55i7keo2tw4l7vjbq6o2dg5xdpkbcghostaq"
OTHER_ID = "pgbjsmjxg33wpowfhwyops6fsqm54xfbxn7emmb57a7orcq4t5oq"
KEY = "CMK+72kAW4ECY6mUX7gZfBq3/a//nBraEGnqyP09DlY="
OFFER = Signal(to=GATE_ID, key=KEY, ufrag="bu0a", pwd="9NxZ" * 6, candidates=(
    "5b1e4f3c 1 udp 2130706431 10.79.1.2 51900 typ host",
    "81a2b7d0 1 udp 1694498815 10.79.0.2 51900 typ srflx raddr 10.79.1.2 rport 51900"))


def test_round_trip_and_relay_sender() -> None:
    assert decode(encode(OFFER)) == OFFER
    relayed = OFFER.via_relay(OTHER_ID)
    assert decode(encode(relayed)).sender == OTHER_ID


def _with(**changes: object) -> bytes:
    obj = json.loads(encode(OFFER))
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize("body", [
    b"", b"[]", b"\xff", _with(v=2), _with(to="REPLACE-ME"), _with(**{"from": 7}), _with(key="short"),
    _with(key="not a key at all, but forty-four characters"), _with(ufrag=""), _with(pwd=None),
    _with(candidates="one"), _with(candidates=[1]), _with(candidates=["x" * 257]),
    _with(candidates=["c"] * (MAX_CANDIDATES + 1)), b" " * (MAX_MESSAGE + 1), b"[" * 100000,
])
def test_refused(body: bytes) -> None:
    with pytest.raises(SignalError):
        decode(body)


@budget(1000)
@given(st.data())
def test_truncations_and_suffixes(data: st.DataObject) -> None:
    whole = encode(OFFER)
    cut = data.draw(st.integers(0, len(whole)))
    piece = whole[:cut] + data.draw(st.binary(max_size=16))
    try:
        assert isinstance(decode(piece), Signal)
    except SignalError:
        pass


@budget(1000)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=60),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
                    max_leaves=20))
def test_any_json_is_a_signal_or_refused(obj: object) -> None:
    try:
        assert isinstance(decode(json.dumps(obj).encode()), Signal)
    except SignalError:
        pass
