"""The Capsule Protocol (RFC 9297) as CONNECT-UDP (RFC 9298) uses it: pure codec, no sockets.

A capsule is varint type, varint length, value. DATAGRAM capsules (type 0x00) carry a varint context id
and, for context id 0, one UDP payload. Capsule types we do not know are skipped (RFC 9297 section 3.2);
DATAGRAMs with another context id are dropped (RFC 9298 section 4: unknown contexts are ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

from sniff.result import NEED_MORE, NeedMore

__all__ = ["DATAGRAM", "MAX_CAPSULE", "MAX_UDP_PAYLOAD", "Capsule", "CapsuleError", "CapsuleReader",
           "datagram_capsule", "datagram_header", "datagram_payload", "encode_varint", "pull_capsule", "pull_varint"]

DATAGRAM = 0x00
# The largest UDP payload (65535 - 8 byte UDP header; RFC 9298 section 5 bounds it the same way).
MAX_UDP_PAYLOAD = 65527
# The largest capsule value we accept, of any type: a DATAGRAM of the largest UDP payload and an
# 8-byte context id. A capsule is held whole until it is complete, so this is what one stream's
# partial capsule can make us buffer; a longer one is a CapsuleError (the stream is reset).
MAX_CAPSULE = MAX_UDP_PAYLOAD + 8
VARINT_MAX = (1 << 62) - 1


class CapsuleError(ValueError):
    """The peer's capsule stream is malformed or over MAX_CAPSULE: the stream must be reset."""


@dataclass(frozen=True, slots=True)
class Capsule:
    type: int
    value: bytes


def encode_varint(n: int) -> bytes:
    """QUIC variable-length integer (RFC 9000 section 16), shortest form."""
    if n < 0x40:
        return bytes((n,))
    if n < 0x4000:
        return (n | 0x4000).to_bytes(2, "big")
    if n < 0x4000_0000:
        return (n | 0x8000_0000).to_bytes(4, "big")
    if n <= VARINT_MAX:
        return (n | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise ValueError(f"{n} does not fit a varint")


def pull_varint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | NeedMore:
    """The varint at ``pos`` and the position after it, or NEED_MORE."""
    if pos >= len(data):
        return NEED_MORE
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > len(data):
        return NEED_MORE
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | data[pos + i]
    return value, pos + size


def pull_capsule(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[Capsule, int] | NeedMore:
    """The capsule at ``pos`` and the position after it; NEED_MORE for a valid prefix; CapsuleError for a
    length over MAX_CAPSULE (known before the value arrives, so it is never buffered)."""
    kind = pull_varint(data, pos)
    if isinstance(kind, NeedMore):
        return NEED_MORE
    length = pull_varint(data, kind[1])
    if isinstance(length, NeedMore):
        return NEED_MORE
    size, start = length
    if size > MAX_CAPSULE:
        raise CapsuleError(f"capsule of {size} bytes (over {MAX_CAPSULE})")
    if start + size > len(data):
        return NEED_MORE
    return Capsule(kind[0], bytes(data[start:start + size])), start + size


def datagram_payload(capsule: Capsule) -> bytes | None:
    """The UDP payload of a DATAGRAM capsule with context id 0; None for other types and contexts (to be
    skipped); CapsuleError for a DATAGRAM whose value does not hold a whole context id."""
    if capsule.type != DATAGRAM:
        return None
    context = pull_varint(capsule.value, 0)
    if isinstance(context, NeedMore):
        raise CapsuleError("DATAGRAM capsule without a context id")
    if context[0] != 0:
        return None
    return capsule.value[context[1]:]


def datagram_header(size: int) -> bytes:
    """What precedes a ``size``-byte payload in a DATAGRAM capsule with context id 0: type, length, context."""
    return b"".join((b"\x00", encode_varint(size + 1), b"\x00"))


def datagram_capsule(payload: bytes | memoryview) -> bytes:
    """A DATAGRAM capsule carrying ``payload`` with context id 0."""
    return datagram_header(len(payload)) + payload


class CapsuleReader:
    """Cuts a stream's DATA into the UDP payloads it carries. Holds at most one partial capsule (its
    header and up to MAX_CAPSULE value bytes); ``feed`` raises CapsuleError for a malformed stream."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The complete UDP payloads ``data`` finishes (unknown capsules and contexts skipped)."""
        if self.buffer:
            self.buffer += data
            buf: bytes | bytearray = self.buffer
        else:
            buf = data
        payloads: list[bytes] = []
        pos, end = 0, len(buf)
        while True:
            # the common capsule, read inline: type 0 (one byte), a 1- or 2-byte length, context id 0
            if pos + 3 < end and buf[pos] == DATAGRAM and buf[pos + 1] < 0x80:
                if buf[pos + 1] < 0x40:
                    size, start = buf[pos + 1], pos + 2
                else:
                    size, start = ((buf[pos + 1] & 0x3F) << 8) | buf[pos + 2], pos + 3
                if size and start + size <= end and buf[start] == 0:
                    payloads.append(bytes(buf[start + 1:start + size]))
                    pos = start + size
                    continue
            found = pull_capsule(buf, pos)
            if isinstance(found, NeedMore):
                break
            capsule, pos = found
            payload = datagram_payload(capsule)
            if payload is not None:
                payloads.append(payload)
        if buf is self.buffer:
            del self.buffer[:pos]
        else:
            self.buffer = bytearray(buf[pos:])
        return payloads
