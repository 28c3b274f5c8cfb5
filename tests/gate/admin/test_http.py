"""The admin listener's request reader: a request, the client gone, or BadRequest with its status;
property-fuzzed as the other parsers are."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from gate.admin.http import MAX_BODY, MAX_HEAD, BadRequest, Request, Response, read_request
from tests.fuzzing import budget

GOOD = b"GET /route?listener=socks&dst=1.2.3.4%3A443 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n"


def _read(data: bytes, chunk: int = 1 << 20) -> Request | BadRequest | None:
    async def go() -> Request | BadRequest | None:
        reader = asyncio.StreamReader()
        for i in range(0, len(data), chunk):
            reader.feed_data(data[i : i + chunk])
        reader.feed_eof()
        try:
            return await read_request(reader)
        except BadRequest as e:
            return e

    return asyncio.run(go())


def test_a_request_and_its_query() -> None:
    got = _read(GOOD)
    assert got == Request("GET", "/route", {"listener": "socks", "dst": "1.2.3.4:443"},
                          {"host": "x", "authorization": "Bearer t"})
    assert _read(b"") is None  # connected and closed without a word


def test_errors_carry_their_status() -> None:
    def status(data: bytes) -> int:
        got = _read(data)
        assert isinstance(got, BadRequest), got
        return got.status

    assert status(b"\x16\x03\x01\x00\x05hello\r\n\r\n") == 400
    assert status(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n") == 431
    assert status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9999\r\n\r\n" + b"z" * 9999) == 413
    assert MAX_BODY < 9999
    assert status(GOOD[:20]) == 400  # closed in the middle of the head
    assert status(b"GET /?" + b"&".join(b"k%d=v" % i for i in range(40)) + b" HTTP/1.1\r\nHost: x\r\n\r\n") == 400


def test_response_head() -> None:
    assert Response(401, b"{}", headers=(("www-authenticate", "Bearer"),)).encode() == (
        b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
        b"connection: close\r\nwww-authenticate: Bearer\r\n\r\n{}")


@budget(300)
@given(cut=st.integers(min_value=0, max_value=len(GOOD)), suffix=st.binary(max_size=64),
       chunk=st.integers(min_value=1, max_value=64))
def test_fuzz_truncations_suffixes_and_chunking(cut: int, suffix: bytes, chunk: int) -> None:
    got = _read(GOOD[:cut] + suffix, chunk)
    assert got is None or isinstance(got, Request | BadRequest)
    if cut == len(GOOD):
        assert isinstance(got, Request)  # what follows a complete request is not read


@budget(300)
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    got = _read(data)
    assert got is None or isinstance(got, Request | BadRequest)
    if isinstance(got, BadRequest):
        assert got.status in (400, 413, 431)
