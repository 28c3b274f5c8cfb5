"""First-datagram sniffers for UDP: STUN, DNS queries, WireGuard handshakes and DTLS ClientHellos.

A datagram is whole, so these return a frozen result or raise NotThisProtocol (no NEED_MORE).
"""

from __future__ import annotations

from dataclasses import dataclass

from sniff.result import NotThisProtocol
from sniff.tls import ClientHello, parse_handshake_message

__all__ = ["DnsQuery", "Stun", "WireGuard", "parse_dns_query", "parse_dtls_client_hello", "parse_stun",
           "parse_wireguard"]

STUN_MAGIC = 0x2112A442  # RFC 5389: what tells STUN from the other protocols sharing a port (cunicu)
DNS_MAX_NAME = 255  # RFC 1035 2.3.4
# WireGuard message type -> exact length of that message (the protocol has no variable-size messages)
WIREGUARD = {1: ("initiation", 148), 2: ("response", 92), 3: ("cookie", 64)}


@dataclass(frozen=True)
class Stun:
    method: int  # 0x001 Binding
    message_class: str  # request | indication | success | error
    transaction_id: bytes


@dataclass(frozen=True)
class DnsQuery:
    name: str
    qtype: int
    id: int


@dataclass(frozen=True)
class WireGuard:
    message: str  # initiation | response | cookie | data
    sender: int  # the sender's index (receiver's for data messages)


def parse_stun(data: bytes) -> Stun:
    if len(data) < 20 or data[0] & 0xC0 or int.from_bytes(data[4:8], "big") != STUN_MAGIC:
        raise NotThisProtocol("not STUN")
    length = int.from_bytes(data[2:4], "big")
    if length % 4 or 20 + length != len(data):
        raise NotThisProtocol("bad STUN length")
    kind = int.from_bytes(data[0:2], "big")
    method = (kind & 0x000F) | ((kind & 0x00E0) >> 1) | ((kind & 0x3E00) >> 2)
    message_class = ("request", "indication", "success", "error")[((kind >> 4) & 1) | ((kind >> 7) & 2)]
    return Stun(method, message_class, data[8:20])


def parse_dns_query(data: bytes) -> DnsQuery:
    if len(data) < 17:
        raise NotThisProtocol("too short for a DNS query")
    flags, qdcount = int.from_bytes(data[2:4], "big"), int.from_bytes(data[4:6], "big")
    if flags & 0x8000 or (flags >> 11) & 0xF != 0 or qdcount != 1:
        raise NotThisProtocol("not a standard DNS query with one question")
    labels, pos = [], 12
    while True:
        if pos >= len(data):
            raise NotThisProtocol("truncated DNS name")
        size = data[pos]
        pos += 1
        if size == 0:
            break
        if size > 63 or pos + size > len(data):
            raise NotThisProtocol("bad DNS label")
        try:
            labels.append(data[pos : pos + size].decode("ascii").lower())
        except UnicodeDecodeError:
            raise NotThisProtocol("DNS label is not ASCII") from None
        pos += size
        if pos - 12 > DNS_MAX_NAME:
            raise NotThisProtocol("DNS name too long")
    if pos + 4 > len(data):
        raise NotThisProtocol("truncated DNS question")
    return DnsQuery(".".join(labels), int.from_bytes(data[pos : pos + 2], "big"), int.from_bytes(data[0:2], "big"))


def parse_wireguard(data: bytes) -> WireGuard:
    if len(data) < 16 or data[1:4] != b"\x00\x00\x00":
        raise NotThisProtocol("not WireGuard")
    if data[0] == 4:  # transport data: 16-byte header, payload padded to 16 bytes, plus the tag
        if (len(data) - 16) % 16:
            raise NotThisProtocol("bad WireGuard data length")
        return WireGuard("data", int.from_bytes(data[4:8], "little"))
    kind = WIREGUARD.get(data[0])
    if kind is None or len(data) != kind[1]:
        raise NotThisProtocol("not a WireGuard handshake message")
    return WireGuard(kind[0], int.from_bytes(data[4:8], "little"))


def parse_dtls_client_hello(data: bytes) -> ClientHello:
    """DTLS 1.2 ClientHello in one datagram (record header 13 bytes, handshake header 12)."""
    if len(data) < 25 or data[0] != 22 or data[1] != 0xFE:
        raise NotThisProtocol("not a DTLS handshake record")
    length = int.from_bytes(data[11:13], "big")
    if 13 + length > len(data):
        raise NotThisProtocol("truncated DTLS record")
    if length < 12:  # (an empty record was an IndexError, found by scripts/fuzz_parsers.py)
        raise NotThisProtocol("DTLS record too short for a handshake header")
    body = data[13 : 13 + length]
    if body[0] != 1 or body[6:9] != b"\x00\x00\x00" or body[1:4] != body[9:12]:
        raise NotThisProtocol("not a whole (unfragmented) DTLS ClientHello")
    # DTLS adds message_seq/fragment fields and a cookie; reframe as a TLS handshake message
    hello = body[12 : 12 + int.from_bytes(body[1:4], "big")]
    if len(hello) < 35 or 35 + hello[34] >= len(hello):
        raise NotThisProtocol("truncated DTLS ClientHello")
    session_end = 35 + hello[34]
    cookie_end = session_end + 1 + hello[session_end]
    tls_body = hello[:session_end] + hello[cookie_end:]
    message = b"\x01" + len(tls_body).to_bytes(3, "big") + tls_body
    return parse_handshake_message(message, consumed=13 + length)
