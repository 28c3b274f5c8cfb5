"""Parser fuzz targets: one check per parser that takes any bytes and fails only when the parser breaks
its contract (a frozen result that fits the input, NEED_MORE, or its own parse error; never another
exception).

The hypothesis tests beside each parser find structured cases in CI; these targets carry the volume:
``scripts/fuzz --long`` runs each under atheris (libFuzzer, coverage-guided) for >= 1M inputs, seeded
with the captured real-client fixtures (hypothesis runs ~200 inputs/s here, a nightly 1M per parser
would take a day; atheris runs thousands per second). tests/test_fuzz_targets.py keeps the targets
honest in CI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gate.mesh.capsules import MAX_CAPSULE, CapsuleError, CapsuleReader, datagram_capsule, encode_varint
from gate.proto.http import TargetError, connect_authority, split_absolute_uri
from gate.proto.socks import SocksError, parse_credentials, parse_first, parse_request
from gate.proto.socks_udp import SocksUdpError, parse_datagram
from gate.proto.stun import binding_response
from sniff.classify import Sniffed, classify, classify_datagrams
from sniff.http import parse_h2_preface, parse_http_request
from sniff.proxy_protocol import build_v1, build_v2, parse_proxy_header
from sniff.quic import parse_quic_initial
from sniff.result import NEED_MORE, NotThisProtocol
from sniff.ssh import parse_ssh_banner
from sniff.tls import parse_client_hello
from sniff.udp import parse_dns_query, parse_dtls_client_hello, parse_stun, parse_wireguard

__all__ = ["TARGETS", "Target", "datagrams_of"]

FIXTURES = Path(__file__).parent / "sniff" / "fixtures"


@dataclass(frozen=True)
class Target:
    """A parser under fuzz: ``check(data)`` raises only when the contract is broken."""

    check: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]] = list  # inputs captured from real clients to start from


def _files(*names: str) -> Callable[[], list[bytes]]:
    return lambda: [(FIXTURES / name).read_bytes() for name in names]


def _given(*inputs: bytes) -> Callable[[], list[bytes]]:
    return lambda: list(inputs)


def _message(parse: Callable[[bytes], Any], error: type[Exception]) -> Callable[[bytes], None]:
    """A stream parser: a result whose ``consumed`` lies within the input, NEED_MORE, or ``error``."""

    def check(data: bytes) -> None:
        try:
            result = parse(data)
        except error:
            return
        assert result is NEED_MORE or 0 < result.consumed <= len(data), result

    return check


def _verdict(parse: Callable[[bytes], Any], error: type[Exception]) -> Callable[[bytes], None]:
    """A parser of a whole message (a datagram, a preface, a target): any result, or ``error``."""

    def check(data: bytes) -> None:
        try:
            parse(data)
        except error:
            pass

    return check


def _stun_answer(data: bytes) -> None:
    """The STUN server's answer: nothing, or a Binding response naming the requester (never an error)."""
    answer = binding_response(data, "198.51.100.7", 4242)
    assert answer is None or parse_stun(answer).message_class == "success", answer


def _classify(data: bytes) -> None:
    result = classify(data)
    assert result is NEED_MORE or isinstance(result, Sniffed), result


MAX_FUZZ_DATAGRAMS = 4  # a first flight is 1-3 datagrams; more only slows the fuzzer down


def datagrams_of(data: bytes) -> list[bytes]:
    """Datagrams from fuzz input laid out as the QUIC fixtures are (each behind a 2-byte length), so
    the captured flights seed it as they are; whatever does not fit the layout is the last datagram."""
    out, pos = [], 0
    while pos + 2 <= len(data) and len(out) < MAX_FUZZ_DATAGRAMS - 1:
        size = int.from_bytes(data[pos:pos + 2], "big")
        out.append(data[pos + 2:pos + 2 + size])
        pos += 2 + size
    return [*out, data[pos:]] if pos < len(data) or not out else out


def _quic(data: bytes) -> None:
    try:
        parse_quic_initial(datagrams_of(data))
    except NotThisProtocol:
        pass


def _classify_datagrams(data: bytes) -> None:
    result = classify_datagrams(datagrams_of(data))
    assert result is NEED_MORE or isinstance(result, Sniffed), result


def _capsules(data: bytes) -> None:
    """A CONNECT-UDP stream's DATA: whole payloads and one partial capsule held at most, or CapsuleError."""
    reader = CapsuleReader()
    try:
        payloads = reader.feed(data)
    except CapsuleError:
        return
    assert all(isinstance(p, bytes) for p in payloads) and len(reader.buffer) <= MAX_CAPSULE + 16


QUIC_FLIGHTS = ("chromium_quic_initial.bin", "aioquic_initial.bin", "aioquic_initial_split.bin",
                "aioquic_initial_v2.bin")

TARGETS: dict[str, Target] = {
    "tls": Target(_message(parse_client_hello, NotThisProtocol),
                  _files("curl_https.bin", "openssl_sni_alpn.bin", "python_ssl.bin", "chromium_tls.bin",
                         "openssl_tls12_nosni.bin")),
    "http": Target(_message(parse_http_request, NotThisProtocol), _files("curl_http.bin")),
    "ssh": Target(_message(parse_ssh_banner, NotThisProtocol), _files("ssh_banner.bin")),
    "h2-preface": Target(_verdict(parse_h2_preface, NotThisProtocol), _files("curl_h2c_prior.bin")),
    "classify": Target(_classify, _files("curl_https.bin", "curl_http.bin", "curl_h2c_prior.bin", "ssh_banner.bin")),
    "proxy-header": Target(_message(parse_proxy_header, NotThisProtocol),
                           _given(build_v1(("192.0.2.1", 5000), ("198.51.100.2", 443)),
                                  build_v2(("2001:db8::1", 5000), ("2001:db8::2", 443), hops=2))),
    "stun": Target(_verdict(parse_stun, NotThisProtocol), _given(bytes.fromhex(  # RFC 5769 2.1
        "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74"
        "002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149a"
        "eaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf"))),
    "dns": Target(_verdict(parse_dns_query, NotThisProtocol), _files("dig_query.bin")),
    "stun-answer": Target(_stun_answer, lambda: TARGETS["stun"].seeds()),
    "wireguard": Target(_verdict(parse_wireguard, NotThisProtocol),
                        _given(b"\x01\x00\x00\x00" + (0x1234).to_bytes(4, "little") + bytes(range(140)))),
    "dtls": Target(_verdict(parse_dtls_client_hello, NotThisProtocol), _files("openssl_dtls.bin")),
    "quic": Target(_quic, _files(*QUIC_FLIGHTS)),
    "classify-datagrams": Target(_classify_datagrams, _files(*QUIC_FLIGHTS)),
    "socks-first": Target(_message(parse_first, SocksError),
                          _given(b"\x05\x02\x00\x02", b"\x04\x01\x00\x50\x00\x00\x00\x01user\x00example.test\x00")),
    "socks-request": Target(_message(parse_request, SocksError),
                            _given(b"\x05\x01\x00\x03\x0cexample.test\x01\xbb",
                                   b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50")),
    "socks-credentials": Target(_message(parse_credentials, SocksError), _given(b"\x01\x04user\x06secret")),
    "socks-udp": Target(_verdict(parse_datagram, SocksUdpError),
                        _given(b"\x00\x00\x00\x01\x7f\x00\x00\x01\x14\xe9hello",
                               b"\x00\x00\x00\x03\x09localhost\x00\x35q",
                               b"\x00\x00\x00\x04" + bytes(15) + b"\x01\x00\x35")),
    "http-authority": Target(_verdict(connect_authority, TargetError), _given(b"example.test:443", b"[::1]:8443")),
    "capsules": Target(_capsules, _given(datagram_capsule(b"\x00" * 40) + encode_varint(0x2A) + b"\x03xyz"
                                         + datagram_capsule(bytes(range(200))))),
    "http-absolute-uri": Target(_verdict(split_absolute_uri, TargetError),
                                _given(b"http://example.test:8080/path?q=1", b"http://[2001:db8::1]/")),
}
