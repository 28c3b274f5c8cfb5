"""Which protocol a flow speaks, from its first bytes, with the metadata routing uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sniff.http import parse_h2_preface, parse_http_request
from sniff.quic import parse_quic_initial
from sniff.result import NEED_MORE, NeedMore, NotThisProtocol
from sniff.ssh import parse_ssh_banner
from sniff.tls import parse_client_hello
from sniff.udp import parse_dns_query, parse_dtls_client_hello, parse_stun, parse_wireguard

__all__ = ["MAX_SNIFF", "Sniffed", "classify", "classify_datagrams"]

# Bytes a flow may be held for sniffing; beyond it the flow is "unknown" and relayed as it is.
MAX_SNIFF = 16 * 1024 + 5


@dataclass(frozen=True)
class Sniffed:
    protocol: str  # "tls" | "http" | "h2c" | "ssh" | "socks" | "unknown"
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    host: str | None = None  # HTTP Host (TLS: the SNI)
    ech: bool = False
    detail: str | None = None  # e.g. the HTTP method, the SSH software


def _tls(data: bytes) -> Sniffed | NeedMore:
    hello = parse_client_hello(data)
    if isinstance(hello, NeedMore):
        return hello
    return Sniffed("tls", sni=hello.sni, alpn=hello.alpn, host=hello.sni, ech=hello.ech)


def _h2c(data: bytes) -> Sniffed | NeedMore:
    found = parse_h2_preface(data)
    return found if isinstance(found, NeedMore) else Sniffed("h2c")


def _http(data: bytes) -> Sniffed | NeedMore:
    request = parse_http_request(data)
    if isinstance(request, NeedMore):
        return request
    return Sniffed("http", host=request.host, detail=request.method)


def _ssh(data: bytes) -> Sniffed | NeedMore:
    banner = parse_ssh_banner(data)
    return banner if isinstance(banner, NeedMore) else Sniffed("ssh", detail=banner.software)


def _socks(data: bytes) -> Sniffed | NeedMore:
    # SOCKS4 CONNECT, or a SOCKS5 greeting offering a handful of methods
    plausible = len(data) >= 2 and ((data[0] == 4 and data[1] == 1) or (data[0] == 5 and 0 < data[1] < 10))
    if plausible:
        return Sniffed("socks", detail=f"v{data[0]}")
    if len(data) < 2 and data[0] in (4, 5):
        return NEED_MORE
    raise NotThisProtocol("not a SOCKS greeting")


_SNIFFERS: list[Callable[[bytes], Any]] = [_tls, _h2c, _http, _ssh, _socks]
# The sniffers that can match a flow starting with a given byte, in the order above: sniffing is on the
# path of every connection, and trying each parser in turn (each failing with an exception) cost about
# as much as the HTTP parse itself. Each parser still checks everything; this only skips the hopeless.
_BY_FIRST_BYTE: list[list[Callable[[bytes], Any]]] = [
    [f for f, can in ((_tls, b == 0x16), (_h2c, b == ord("P")), (_http, ord("A") <= b <= ord("Z")),
                      (_ssh, b == ord("S")), (_socks, b in (4, 5))) if can]
    for b in range(256)
]


def classify(data: bytes) -> Sniffed | NeedMore:
    """The protocol of ``data``; NEED_MORE while some sniffer could still match."""
    if not data:
        return NEED_MORE
    waiting = False
    for sniff in _BY_FIRST_BYTE[data[0]]:
        try:
            result = sniff(data[:MAX_SNIFF])
        except NotThisProtocol:
            continue
        if isinstance(result, Sniffed):
            return result
        waiting = True
    return NEED_MORE if waiting and len(data) < MAX_SNIFF else Sniffed("unknown")


def _datagram_sniffers() -> list[Callable[[list[bytes]], Sniffed | NeedMore]]:
    def stun(datagrams: list[bytes]) -> Sniffed:
        found = parse_stun(datagrams[0])
        return Sniffed("stun", detail=found.message_class)

    def wireguard(datagrams: list[bytes]) -> Sniffed:
        return Sniffed("wireguard", detail=parse_wireguard(datagrams[0]).message)

    def dtls(datagrams: list[bytes]) -> Sniffed:
        hello = parse_dtls_client_hello(datagrams[0])
        return Sniffed("dtls", sni=hello.sni, alpn=hello.alpn, host=hello.sni)

    def quic(datagrams: list[bytes]) -> Sniffed | NeedMore:
        try:
            hello = parse_quic_initial(datagrams)
        except NotThisProtocol:
            if len(datagrams) > 1:  # the first was an Initial (nothing else asks for more): its hello never ended
                return Sniffed("quic")
            raise
        if isinstance(hello, NeedMore):  # the hello continues in the next datagram(s)
            return hello
        return Sniffed("quic", sni=hello.sni, alpn=hello.alpn, host=hello.sni, ech=hello.ech)

    def dns(datagrams: list[bytes]) -> Sniffed:
        query = parse_dns_query(datagrams[0])
        return Sniffed("dns", host=query.name, detail=str(query.qtype))

    return [stun, wireguard, dtls, quic, dns]


_DATAGRAM_SNIFFERS = _datagram_sniffers()


def classify_datagrams(datagrams: list[bytes]) -> Sniffed | NeedMore:
    """The protocol of a UDP flow from its first datagram, or its first few when a QUIC Initial's
    ClientHello continues in the next ones (Chromium's does): NEED_MORE then, until it is whole or
    ``quic.MAX_DATAGRAMS`` came (a datagram is whole, so no other protocol ever needs more)."""
    if not datagrams:
        return NEED_MORE
    for sniff in _DATAGRAM_SNIFFERS:
        try:
            return sniff(datagrams)
        except NotThisProtocol:
            continue
    return Sniffed("unknown")
