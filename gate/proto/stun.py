"""STUN Binding answers (RFC 8489): what a gate serving as its NATed peers' STUN server sends back.

Pure: bytes in, bytes out. Only Binding requests are answered, and the answer is at most 32 bytes longer
than the smallest request (20 bytes), so a spoofed source gains little by reflecting through us.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib

from sniff.result import NotThisProtocol
from sniff.udp import parse_stun

__all__ = ["binding_response"]

MAGIC_COOKIE = 0x2112A442
BINDING = 0x001
BINDING_SUCCESS = 0x0101  # method Binding, class success response
XOR_MAPPED_ADDRESS = 0x0020
FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E  # "STUN", RFC 8489 section 14.7


def binding_response(request: bytes, host: str, port: int) -> bytes | None:
    """The Binding success response to ``request`` naming ``host``:``port`` (the requester as we see it)
    in XOR-MAPPED-ADDRESS, with a FINGERPRINT; None when ``request`` is not a Binding request (nothing
    else is answered). Attributes of the request are not needed for a Binding answer and are ignored."""
    try:
        stun = parse_stun(request)
    except NotThisProtocol:
        return None
    if stun.method != BINDING or stun.message_class != "request":
        return None
    ip = ipaddress.ip_address(host)
    txid = stun.transaction_id
    if ip.version == 4:
        family, xor = 1, MAGIC_COOKIE.to_bytes(4, "big")
    else:
        family, xor = 2, MAGIC_COOKIE.to_bytes(4, "big") + txid
    address = bytes(a ^ b for a, b in zip(ip.packed, xor, strict=True))
    value = struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + address
    attribute = struct.pack("!HH", XOR_MAPPED_ADDRESS, len(value)) + value
    # the header's length counts the FINGERPRINT attribute (8 bytes) that follows, as its CRC covers it
    message = struct.pack("!HHI", BINDING_SUCCESS, len(attribute) + 8, MAGIC_COOKIE) + txid + attribute
    crc = (zlib.crc32(message) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    return message + struct.pack("!HHI", FINGERPRINT, 4, crc)
