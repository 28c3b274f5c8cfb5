"""Which protocol a datagram on the shared ICE/WireGuard port is: RFC 7983's first-byte ranges, with
STUN's magic cookie, and WireGuard's message types. Pure; the counters (and mode 1's relay) use it.

RFC 7983 section 7: first byte 0..3 is STUN (the two top bits of a STUN message type are zero), 20..63
DTLS, 64..79 TURN channels, 128..191 RTP/RTCP. WireGuard's messages start with a type byte 1..4 followed
by three zero bytes, which falls in STUN's range: the magic cookie (bytes 4..8 = 0x2112A442) is what tells
them apart, as the nftables rule of mode 3 does (tproxy.wg_redirect).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Datagram", "classify"]

STUN_COOKIE = b"\x21\x12\xa4\x42"
# WireGuard message type -> its fixed size (0: any size of at least 32, the transport data message)
WG_SIZES = {1: 148, 2: 92, 3: 64, 4: 0}
WG_DATA_MIN = 32  # type, receiver index, counter (16 bytes) and an empty payload's 16-byte tag


class Datagram(StrEnum):
    STUN = "stun"
    WIREGUARD = "wireguard"
    OTHER = "other"  # neither (DTLS, RTP, garbage): dropped, and counted


def classify(data: bytes) -> Datagram:
    """The protocol of one whole datagram."""
    if len(data) < 4:
        return Datagram.OTHER
    if data[0] <= 3 and len(data) >= 20 and data[4:8] == STUN_COOKIE and len(data) % 4 == 0:
        return Datagram.STUN
    size = WG_SIZES.get(data[0])
    if size is not None and data[1:4] == b"\0\0\0" and (len(data) == size or (size == 0 and len(data) >= WG_DATA_MIN)):
        return Datagram.WIREGUARD
    return Datagram.OTHER
