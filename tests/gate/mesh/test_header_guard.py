"""HeaderBlockGuard: the frame-header walk that measures a peer's header blocks before h2 buffers them,
fed real frame sequences from an h2 client (HEADERS split into CONTINUATIONs, DATA between)."""

from __future__ import annotations

import h2.config
import h2.connection
from hypothesis import given
from hypothesis import strategies as st

from gate.mesh.h2_limits import MAX_HEADER_BLOCK, HeaderBlockGuard
from tests.fuzzing import budget

CONTINUATION = 0x9


def client_session(header_bytes: int, data: bytes = b"") -> bytes:
    """What an h2 client sends: preface, SETTINGS, a CONNECT with a header value of ``header_bytes`` 'h's
    (6-bit Huffman codes: 3/4 of that encoded; h2 cuts a block larger than the peer's 16 KiB frames into
    HEADERS + CONTINUATION), DATA, a second CONNECT."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "127.0.0.1:1"), ("ugate-host", "h" * header_bytes)])
    for start in range(0, len(data), 16384):  # the peer's default frame size
        conn.send_data(1, data[start:start + 16384])
    conn.send_headers(3, [(":method", "CONNECT"), (":authority", "127.0.0.1:2")])
    return conn.data_to_send()


def frame_types(wire: bytes) -> list[int]:
    pos, types = 24, []
    while pos < len(wire):
        types.append(wire[pos + 3])
        pos += 9 + int.from_bytes(wire[pos:pos + 3], "big")
    return types


def feed_all(guard: HeaderBlockGuard, wire: bytes, cuts: list[int]) -> bool:
    pos = 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        if not guard.feed(wire[pos:cut]):
            return False
        pos = cut
    return True


BIG = client_session(60_000, b"x" * 50_000)  # a 44 KiB header block: over MAX_HEADER_BLOCK (32 KiB)
FITS = client_session(12_000, b"x" * 50_000)  # 9 KiB: within it, in one HEADERS frame
SPLIT = client_session(30_000, b"y" * 1000)  # 22 KiB: HEADERS + CONTINUATION, within the limit


def test_the_sequences_are_what_they_claim() -> None:
    assert CONTINUATION in frame_types(BIG) and CONTINUATION in frame_types(SPLIT)
    assert CONTINUATION not in frame_types(FITS)


def test_a_block_within_the_limit_passes_and_one_over_it_is_refused() -> None:
    assert HeaderBlockGuard(MAX_HEADER_BLOCK, server=True).feed(FITS)
    assert HeaderBlockGuard(MAX_HEADER_BLOCK, server=True).feed(SPLIT)
    assert not HeaderBlockGuard(MAX_HEADER_BLOCK, server=True).feed(BIG)
    assert not HeaderBlockGuard(16 << 10, server=True).feed(SPLIT)  # the continued block is summed


def test_a_client_side_guard_has_no_preface_to_skip() -> None:
    assert not HeaderBlockGuard(MAX_HEADER_BLOCK, server=False).feed(BIG[24:])
    assert HeaderBlockGuard(MAX_HEADER_BLOCK, server=False).feed(SPLIT[24:])


def test_byte_at_a_time_gives_the_same_verdict() -> None:
    for wire, verdict in ((FITS, True), (SPLIT, True), (BIG, False)):
        guard = HeaderBlockGuard(MAX_HEADER_BLOCK, server=True)
        assert feed_all(guard, wire, list(range(1, len(wire)))) is verdict


def test_the_refusal_comes_at_the_frame_header_before_the_payload() -> None:
    """A CONTINUATION announcing 16 MiB is refused from its 9 bytes: nothing of it needs to arrive."""
    guard = HeaderBlockGuard(MAX_HEADER_BLOCK, server=False)
    headers = b"\x00\x00\x10\x01\x00\x00\x00\x00\x01" + b"\x00" * 16  # HEADERS, no END_HEADERS, stream 1
    assert guard.feed(headers)
    assert not guard.feed(b"\xff\xff\xff\x09\x00\x00\x00\x00\x01")


@given(st.sampled_from([(FITS, True), (SPLIT, True), (BIG, False)]),
       st.lists(st.integers(min_value=1, max_value=len(BIG) - 1), max_size=40))
@budget(300)
def test_any_split_of_the_reads_gives_the_same_verdict(case: tuple[bytes, bool], cuts: list[int]) -> None:
    wire, verdict = case
    guard = HeaderBlockGuard(MAX_HEADER_BLOCK, server=True)
    assert feed_all(guard, wire, [c for c in cuts if c < len(wire)]) is verdict


@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0, max_value=4096), max_size=20))
@budget(500)
def test_random_bytes_give_a_verdict_and_never_an_error(wire: bytes, cuts: list[int]) -> None:
    result = feed_all(HeaderBlockGuard(MAX_HEADER_BLOCK, server=True), wire, [c for c in cuts if c < len(wire)])
    assert isinstance(result, bool)
