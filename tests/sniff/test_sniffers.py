"""Sniffers on bytes captured from real clients (scripts/capture_sniff_fixtures.py), table cases, and
property fuzzing: every truncation is NEED_MORE, suffixes do not change the result, byte-at-a-time
feeding reaches it exactly at its end, and arbitrary input only gives result / NEED_MORE / NotThisProtocol."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniff.classify import Sniffed, classify
from sniff.http import HttpRequest, parse_h2_preface, parse_http_request
from sniff.result import NEED_MORE, NotThisProtocol
from sniff.ssh import SshBanner, parse_ssh_banner
from sniff.tls import ClientHello, parse_client_hello
from tests.fuzzing import budget

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def split_records(data: bytes, size: int) -> bytes:
    """The same handshake message re-cut into TLS records of ``size`` bytes (as some clients send)."""
    length = int.from_bytes(data[3:5], "big")
    body, out = data[5 : 5 + length], b""
    for i in range(0, len(body), size):
        chunk = body[i : i + size]
        out += data[:3] + len(chunk).to_bytes(2, "big") + chunk
    return out


def with_ech(hello: bytes) -> bytes:
    """Append an encrypted_client_hello extension (type 0xfe0d) to a one-record ClientHello."""
    ext = struct.pack("!HH", 0xFE0D, 4) + b"\x00\x00\x01\x02"
    body = bytearray(hello[5:])
    # handshake length, then the extensions length at the end of the fixed part
    pos = 4 + 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    ext_len = int.from_bytes(body[pos : pos + 2], "big")
    body[pos : pos + 2] = (ext_len + len(ext)).to_bytes(2, "big")
    body += ext
    body[1:4] = (len(body) - 4).to_bytes(3, "big")
    return hello[:3] + len(body).to_bytes(2, "big") + bytes(body)


CASES: list[tuple[Callable[[bytes], Any], bytes, Any]] = [
    (parse_client_hello, fixture("openssl_sni_alpn.bin"),
     ClientHello("example.test", ("h2", "http/1.1"), 0x0303, (0x0304, 0x0303, 0x0302, 0x0301), False, 336)),
    (parse_client_hello, fixture("curl_https.bin"),
     ClientHello("www.example.test", ("h2", "http/1.1"), 0x0303, (0x0304, 0x0303, 0x0302, 0x0301), False, 517)),
    (parse_client_hello, fixture("python_ssl.bin"),
     ClientHello("python.example.test", ("h2", "http/1.1"), 0x0303, (0x0304, 0x0303), False, 517)),
    (parse_client_hello, fixture("openssl_tls12_nosni.bin"), ClientHello(None, (), 0x0303, (), False, 188)),
    # Chromium 156: a 1.9 KB hello (post-quantum key share), GREASE versions, and a (GREASE) ECH extension,
    # which on the wire looks like real ECH: the name seen is the outer one
    (parse_client_hello, fixture("chromium_tls.bin"),
     ClientHello("www.example.test", ("h2", "http/1.1"), 0x0303, (0x7A7A, 0x0304, 0x0303), True, 1924)),
    (parse_http_request, fixture("curl_http.bin"), HttpRequest("GET", "/path?q=1", "1.1", "web.example.test", 88)),
    (parse_http_request, b"GET http://Abs.Example:8080/x HTTP/1.0\r\n\r\n",
     HttpRequest("GET", "http://Abs.Example:8080/x", "1.0", "abs.example", 42)),
    (parse_http_request, b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n",
     HttpRequest("CONNECT", "[::1]:443", "1.1", "::1", 47)),
    # a line starting with a space continues the previous field: the first real Host field counts
    (parse_http_request, b'GET / HTTP/1.1\r\nX-A: 1\r\n Host: folded.example\r\nhost: Real.Example:80\r\n\r\n',
     HttpRequest("GET", "/", "1.1", "real.example", 72)),
    (parse_ssh_banner, fixture("ssh_banner.bin"), SshBanner("2.0", "OpenSSH_9.2p1", 40)),
]
IDS = [f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize(("parse", "data", "expected"), CASES, ids=IDS)
def test_real_bytes(parse: Callable[[bytes], Any], data: bytes, expected: Any) -> None:
    assert parse(data) == expected


@pytest.mark.parametrize(("parse", "data", "expected"), CASES, ids=IDS)
def test_every_truncation_needs_more(parse: Callable[[bytes], Any], data: bytes, expected: Any) -> None:
    for cut in range(len(data) if parse is not parse_http_request else expected.consumed):
        assert parse(data[:cut]) is NEED_MORE, cut


@pytest.mark.parametrize(("parse", "data", "expected"), CASES, ids=IDS)
@budget(50)
@given(suffix=st.binary(max_size=100))
def test_suffixes_do_not_change_the_result(parse: Callable[[bytes], Any], data: bytes, expected: Any,
                                           suffix: bytes) -> None:
    assert parse(data + suffix) == expected


@pytest.mark.parametrize("size", [1, 7, 100, 200])
def test_hello_split_over_records(size: int) -> None:
    data = split_records(fixture("curl_https.bin"), size)
    hello = parse_client_hello(data)
    assert isinstance(hello, ClientHello) and hello.sni == "www.example.test" and hello.consumed == len(data)
    assert parse_client_hello(data[:-1]) is NEED_MORE


def test_ech_is_reported_with_the_outer_name() -> None:
    hello = parse_client_hello(with_ech(fixture("openssl_sni_alpn.bin")))
    assert isinstance(hello, ClientHello) and hello.ech and hello.sni == "example.test"


@pytest.mark.parametrize(
    ("parse", "data"),
    [
        (parse_client_hello, b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),  # ServerHello, not ClientHello
        (parse_client_hello, b"\x17\x03\x03\x00\x10"),  # application data
        (parse_client_hello, b"\x16\x03\x01\x00\x00"),  # empty record
        (parse_client_hello, b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00"),  # fields overrun
        (parse_http_request, b"get / HTTP/1.1\r\n\r\n"),
        (parse_http_request, b"GET / HTTP/2.0\r\n\r\n"),
        (parse_http_request, b"GET " + b"a" * 20000),
        (parse_ssh_banner, b"SSH-3.0-x\r\n"),
        (parse_ssh_banner, b"SSH-2.0-" + b"x" * 300),
        (parse_h2_preface, b"PRI * HTTP/1.1"),
    ],
)
def test_not_this_protocol(parse: Callable[[bytes], Any], data: bytes) -> None:
    with pytest.raises(NotThisProtocol):
        parse(data)


@pytest.mark.parametrize("parse", [parse_client_hello, parse_http_request, parse_ssh_banner, parse_h2_preface])
@budget(300)
@given(data=st.binary(max_size=400) | st.builds(lambda b: b"\x16\x03\x01" + b, st.binary(max_size=400)))
def test_arbitrary_input_has_three_outcomes(parse: Callable[[bytes], Any], data: bytes) -> None:
    try:
        parse(data)
    except NotThisProtocol:
        pass


@budget(200)
@given(cut=st.integers(0, 516), junk=st.binary(max_size=50))
def test_mutated_hello_never_escapes(cut: int, junk: bytes) -> None:
    data = fixture("curl_https.bin")
    try:
        parse_client_hello(data[:cut] + junk + data[cut + len(junk):])
    except NotThisProtocol:
        pass


@pytest.mark.parametrize(
    ("name", "protocol", "field", "value"),
    [
        ("curl_https.bin", "tls", "sni", "www.example.test"),
        ("python_ssl.bin", "tls", "alpn", ("h2", "http/1.1")),
        ("curl_http.bin", "http", "host", "web.example.test"),
        ("curl_h2c_prior.bin", "h2c", "host", None),
        ("ssh_banner.bin", "ssh", "detail", "OpenSSH_9.2p1"),
    ],
)
def test_classify_fixtures(name: str, protocol: str, field: str, value: Any) -> None:
    found = classify(fixture(name))
    assert isinstance(found, Sniffed) and found.protocol == protocol and getattr(found, field) == value


def test_classify_prefixes_and_unknowns() -> None:
    assert classify(b"") is NEED_MORE
    assert classify(b"\x16\x03") is NEED_MORE
    assert classify(b"GE") is NEED_MORE
    assert classify(b"\x05\x01\x00") == Sniffed("socks", detail="v5")
    assert classify(b"220 smtp.example ESMTP\r\n") == Sniffed("unknown")
    assert classify(b"\x00" * 10) == Sniffed("unknown")


@budget(300)
@given(data=st.binary(max_size=300))
def test_classify_never_raises(data: bytes) -> None:
    assert classify(data) is NEED_MORE or isinstance(classify(data), Sniffed)


@pytest.mark.parametrize("name", ["openssl_sni_alpn.bin", "curl_https.bin", "python_ssl.bin", "chromium_tls.bin",
                                  "curl_http.bin", "curl_h2c_prior.bin", "ssh_banner.bin"])
def test_classify_fed_byte_by_byte(name: str) -> None:
    """As a flow that sends one byte per segment is sniffed: NEED_MORE until the message is whole, then
    exactly what the whole message gives."""
    data = fixture(name)
    whole = classify(data)
    assert isinstance(whole, Sniffed) and whole.protocol != "unknown"
    fed = b""
    for byte in data:
        fed += bytes([byte])
        found = classify(fed)
        if found is not NEED_MORE:
            break
    assert found == whole
