"""QUIC v1/v2 Initial packets: decrypt with the version's initial secrets (RFC 9001 5.2, RFC 9369),
reassemble the CRYPTO frames (also across datagrams, as Chromium splits a large ClientHello), and read
SNI/ALPN with the TLS parser. The AEAD and header-protection primitives are ``cryptography``'s.

``parse_quic_initial(datagrams)`` takes the datagrams of one client flow, oldest first, and returns a
ClientHello, NEED_MORE (the hello continues in a later datagram), or raises NotThisProtocol.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from sniff.result import NEED_MORE, NeedMore, NotThisProtocol
from sniff.tls import MAX_HELLO, ClientHello, parse_handshake_message

__all__ = ["QUIC_V1", "QUIC_V2", "parse_quic_initial"]

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF


@dataclass(frozen=True)
class _Version:
    salt: bytes
    prefix: str  # of the key/iv/hp labels
    initial_type: int  # the long-header packet type of Initial packets


VERSIONS = {
    QUIC_V1: _Version(bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"), "quic", 0),
    QUIC_V2: _Version(bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"), "quicv2", 1),
}
MAX_DATAGRAMS = 8  # a ClientHello spread over more Initial datagrams than this is not sniffed


def _expand_label(secret: bytes, label: str, length: int) -> bytes:
    full = b"tls13 " + label.encode()
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def _client_keys(version: _Version, dcid: bytes) -> tuple[bytes, bytes, bytes]:
    initial = hmac.new(version.salt, dcid, hashlib.sha256).digest()  # HKDF-Extract
    secret = _expand_label(initial, "client in", 32)
    p = version.prefix
    return _expand_label(secret, f"{p} key", 16), _expand_label(secret, f"{p} iv", 12), _expand_label(
        secret, f"{p} hp", 16)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise NotThisProtocol("truncated QUIC varint")
    size = 1 << (data[pos] >> 6)
    if pos + size > len(data):
        raise NotThisProtocol("truncated QUIC varint")
    value = data[pos] & 0x3F
    for b in data[pos + 1 : pos + size]:
        value = (value << 8) | b
    return value, pos + size


def _initial_payload(packet: bytes) -> tuple[bytes, int]:
    """Decrypt the Initial packet at the start of ``packet``; returns (frames, packet length)."""
    if len(packet) < 7 or not packet[0] & 0x80 or not packet[0] & 0x40:
        raise NotThisProtocol("not a QUIC long-header packet")
    version = VERSIONS.get(int.from_bytes(packet[1:5], "big"))
    if version is None or (packet[0] >> 4) & 0x3 != version.initial_type:
        raise NotThisProtocol("not a QUIC v1/v2 Initial packet")
    pos = 5
    dcid_len = packet[pos]
    if dcid_len > 20 or pos + 1 + dcid_len >= len(packet):
        raise NotThisProtocol("bad QUIC connection id")
    dcid = packet[pos + 1 : pos + 1 + dcid_len]
    pos += 1 + dcid_len
    scid_len = packet[pos]
    if scid_len > 20:
        raise NotThisProtocol("bad QUIC connection id")
    pos += 1 + scid_len
    token_len, pos = _varint(packet, pos)
    pos += token_len
    length, pos = _varint(packet, pos)
    end = pos + length
    if end > len(packet) or length < 20:
        raise NotThisProtocol("bad QUIC Initial length")
    key, iv, hp = _client_keys(version, dcid)
    sample = packet[pos + 4 : pos + 20]
    encryptor = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = encryptor.update(sample) + encryptor.finalize()
    first = packet[0] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    pn_bytes = bytes(b ^ m for b, m in zip(packet[pos : pos + pn_len], mask[1 : 1 + pn_len], strict=True))
    header = bytes([first]) + packet[1:pos] + pn_bytes
    nonce = (int.from_bytes(iv, "big") ^ int.from_bytes(pn_bytes, "big")).to_bytes(12, "big")
    try:
        return AESGCM(key).decrypt(nonce, packet[pos + pn_len : end], header), end
    except InvalidTag:
        raise NotThisProtocol("QUIC Initial does not decrypt with the initial keys") from None


def _crypto_frames(frames: bytes) -> list[tuple[int, bytes]]:
    """The CRYPTO frames' (offset, data); PADDING, PING and ACK are skipped, anything else ends."""
    found = []
    pos = 0
    while pos < len(frames):
        kind = frames[pos]
        if kind == 0x00 or kind == 0x01:  # PADDING
            pos += 1
        elif kind in (0x02, 0x03):  # ACK: largest, delay, range count, first range, ranges (, ECN)
            _, pos = _varint(frames, pos + 1)
            _, pos = _varint(frames, pos)
            count, pos = _varint(frames, pos)
            _, pos = _varint(frames, pos)
            for _ in range(count * 2 + (3 if kind == 0x03 else 0)):
                _, pos = _varint(frames, pos)
        elif kind == 0x06:  # CRYPTO
            offset, pos = _varint(frames, pos + 1)
            length, pos = _varint(frames, pos)
            if pos + length > len(frames) or offset + length > MAX_HELLO:
                raise NotThisProtocol("bad QUIC CRYPTO frame")
            found.append((offset, frames[pos : pos + length]))
            pos += length
        else:
            break
    return found


def parse_quic_initial(datagrams: list[bytes]) -> ClientHello | NeedMore:
    """The ClientHello carried by the client's first Initial datagram(s)."""
    if not datagrams:
        return NEED_MORE
    if not datagrams[0]:
        raise NotThisProtocol("an empty datagram is no QUIC Initial")
    stream = bytearray()
    pieces: dict[int, bytes] = {}
    for index, datagram in enumerate(datagrams[:MAX_DATAGRAMS]):
        pos = 0
        while pos < len(datagram):  # coalesced packets: Initials first, then others we cannot read
            try:
                frames, size = _initial_payload(datagram[pos:])
            except NotThisProtocol:
                if index == 0 and pos == 0:
                    raise  # the flow's first datagram must start with a client Initial
                break
            for offset, data in _crypto_frames(frames):
                pieces.setdefault(offset, data)
            pos += size
    while len(stream) in pieces:  # contiguous from offset 0
        stream += pieces[len(stream)]
    if len(stream) >= 4:
        need = 4 + int.from_bytes(stream[1:4], "big")
        if need > MAX_HELLO:
            raise NotThisProtocol(f"ClientHello over {MAX_HELLO} bytes")
        if len(stream) >= need:
            return parse_handshake_message(bytes(stream[:need]), consumed=len(datagrams))
    if len(datagrams) >= MAX_DATAGRAMS:
        raise NotThisProtocol("ClientHello not complete within the sniffed datagrams")
    return NEED_MORE
