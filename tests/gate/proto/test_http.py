"""HTTP proxy helpers: request targets, hop-by-hop headers, Basic credentials; fuzzed targets only
ever give a result or TargetError."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.addr import Endpoint
from gate.proto.http import (
    TargetError,
    check_basic_auth,
    connect_authority,
    forward_headers,
    printable,
    readable,
    split_absolute_uri,
)
from tests.fuzzing import budget


@pytest.mark.parametrize(
    ("target", "origin", "path"),
    [
        (b"http://example.com/", Endpoint("example.com", 80), b"/"),
        (b"http://example.com", Endpoint("example.com", 80), b"/"),
        (b"http://Example.com:8080/a/b?c=d&e", Endpoint("example.com", 8080), b"/a/b?c=d&e"),
        (b"http://127.0.0.1:9/x", Endpoint("127.0.0.1", 9), b"/x"),
        (b"http://[::1]:8080/", Endpoint("::1", 8080), b"/"),
    ],
)
def test_split_absolute_uri(target: bytes, origin: Endpoint, path: bytes) -> None:
    assert split_absolute_uri(target) == (origin, path)


@pytest.mark.parametrize(
    "target", [b"/relative", b"https://example.com/", b"ftp://x/", b"http://", b"http://x:99999/", b"http://\xff/",
               b"http://a b/", b"*"]
)
def test_bad_targets(target: bytes) -> None:
    with pytest.raises(TargetError):
        split_absolute_uri(target)


@pytest.mark.parametrize(
    ("target", "expected"),
    [(b"example.com:443", Endpoint("example.com", 443)), (b"[2001:db8::1]:443", Endpoint("2001:db8::1", 443))],
)
def test_connect_authority(target: bytes, expected: Endpoint) -> None:
    assert connect_authority(target) == expected


@pytest.mark.parametrize("target", [b"example.com", b"example.com:0", b":443", b"[::1]443", b"\xff:1", b"a b:1"])
def test_bad_connect_authority(target: bytes) -> None:
    with pytest.raises(TargetError):
        connect_authority(target)


@budget(300)
@given(target=st.binary(max_size=200))
def test_fuzzed_targets_give_result_or_target_error(target: bytes) -> None:
    for parse in (split_absolute_uri, connect_authority):
        try:
            parse(target)
        except TargetError:
            pass


def test_forward_headers_drops_hop_by_hop_and_named_ones() -> None:
    headers = [(b"Host", b"x"), (b"Connection", b"keep-alive, X-Private"), (b"X-Private", b"1"),
               (b"Proxy-Authorization", b"Basic abc"), (b"Keep-Alive", b"5"), (b"TE", b"trailers"),
               (b"Content-Length", b"3"), (b"Proxy-Connection", b"keep-alive")]
    assert forward_headers(headers, b"1.1 ugate") == [(b"host", b"x"), (b"content-length", b"3"),
                                                      (b"via", b"1.1 ugate")]


def basic(user: str, password: str) -> list[tuple[bytes, bytes]]:
    return [(b"Proxy-Authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))]


def test_basic_auth() -> None:
    users = {"alice": "s3cret:with:colons"}
    assert check_basic_auth(basic("alice", "s3cret:with:colons"), users)
    assert not check_basic_auth(basic("alice", "wrong"), users)
    assert not check_basic_auth(basic("bob", "s3cret:with:colons"), users)
    assert not check_basic_auth([], users)
    assert not check_basic_auth([(b"proxy-authorization", b"Basic !!!")], users)
    assert not check_basic_auth([(b"proxy-authorization", b"Digest abc")], users)
    assert not check_basic_auth([(b"proxy-authorization", b"Basic " + base64.b64encode(b"alice"))], users)


@pytest.mark.parametrize(
    ("parse", "target", "message"),
    [
        (split_absolute_uri, b"/relative", 'request target "/relative" is not an absolute http:// URI'),
        (split_absolute_uri, b"http://\xff/", 'request target "http://\\xff/" is not a URI'),
        (split_absolute_uri, b"https://x/", "https:// targets need CONNECT (this proxy does not terminate TLS)"),
        (connect_authority, b"nonsense", 'CONNECT target "nonsense" is not host:port'),
        (connect_authority, b"a" * 150, f'CONNECT target "{"a" * 100}..." is not host:port'),
    ],
)
def test_target_errors_read_as_text(parse: object, target: bytes, message: str) -> None:
    assert callable(parse)
    with pytest.raises(TargetError) as caught:
        parse(target)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("raw", "text"),
    [(b"GET /", "GET /"), (b"\x16\x03\x01", "\\x16\\x03\\x01"), (b"a\\b\r\n", "a\\x5cb\\x0d\\x0a"),
     (b"\xff" * 3, "\\xff" * 3), (b"x" * 101, "x" * 100 + "...")],
)
def test_printable(raw: bytes, text: str) -> None:
    assert printable(raw) == text


@pytest.mark.parametrize(
    ("message", "text"),
    [
        ("illegal request line: bytearray(b'\\x16\\x03garbage')", 'illegal request line: "\\x16\\x03garbage"'),
        ("illegal chunk header: bytearray(b'zz\\r\\n')", 'illegal chunk header: "zz\\r\\n"'),
        ("Illegal header value b\" it's\"", "Illegal header value \" it's\""),
        ("malformed chunk footer: b'ab' (expected b'\\r\\n')", 'malformed chunk footer: "ab" (expected "\\r\\n")'),
        ("Receive buffer too long", "Receive buffer too long"),
        ("a club'x' stays", "a club'x' stays"),
    ],
)
def test_readable(message: str, text: str) -> None:
    assert readable(message) == text


@budget(300)
@given(raw=st.binary(max_size=200))
def test_readable_unwraps_every_bytes_repr(raw: bytes) -> None:
    for wrapped in (repr(raw), f"bytearray({raw!r})"):
        text = readable(f"illegal line: {wrapped}")
        assert text == f'illegal line: "{repr(raw)[2:-1]}"'
