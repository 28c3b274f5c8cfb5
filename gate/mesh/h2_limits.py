"""What one HTTP/2 mesh connection may make us hold, and the pure accounting that enforces it: a peer
is trusted, but a trusted peer can be compromised (limits as nginx/Envoy after CVE-2023-44487).
No sockets and no h2 objects here; gate.mesh.session applies these at its edges.
"""

from __future__ import annotations

__all__ = ["CLOSE_LINGER", "MAX_HEADER_BLOCK", "MAX_HEADER_LIST", "MAX_PENDING", "MAX_STREAMS",
           "MAX_UNREAD_CONTROL", "PENDING_HIGH", "HeaderBlockGuard", "ResetBudget"]

PENDING_HIGH = 1 << 20  # bytes read from a socket and not yet sendable before we stop reading it
# Streams a peer may have open on one connection (SETTINGS_MAX_CONCURRENT_STREAMS, enforced by h2: one
# more is a connection error). Each holds an upstream descriptor and up to PENDING_HIGH read ahead, so
# this bounds one tunnel at 1000 descriptors (MAX_PENDING bounds the read-ahead); a gate's concurrent
# flows to one peer fit.
MAX_STREAMS = 1000
# SETTINGS_MAX_HEADER_LIST_SIZE (decoded, RFC 9113 accounting): the largest CONNECT a gate sends (16
# ALPN offers of up to 255 bytes, SNI, host, authority) is under 6 KiB; h2's default would be 64 KiB.
MAX_HEADER_LIST = 16 << 10
# Bytes read ahead from upstream sockets across one connection's streams (each up to PENDING_HIGH):
# MAX_STREAMS would allow ~1 GiB a tunnel. 64 MiB lets 64 streams whose windows are closed keep a full
# read-ahead (a flowing stream holds next to nothing: its bytes leave as they come). Past it, streams that
# cannot send stop being read until the total is below half; streams that can send are left alone.
# CONNECT-UDP streams have no socket to stop reading: each holds at most MAX_STREAM_PENDING
# (gate.mesh.datagrams), and past MAX_PENDING their datagrams are dropped instead.
MAX_PENDING = 64 << 20
# The encoded bytes of one header block (HEADERS or PUSH_PROMISE and its CONTINUATIONs) we receive. h2
# buffers up to 64 CONTINUATION frames of max_frame (16 MiB) before it decodes, and MAX_HEADER_LIST is
# only checked then: up to 1 GiB held per connection. HPACK never encodes a field in more bytes than its
# RFC 9113 size (name + value + 32) unless the sender chooses a longer Huffman code, so a block within
# MAX_HEADER_LIST is encoded in MAX_HEADER_LIST bytes; the doubling leaves room for padding (255 bytes a
# frame) and table size updates. Past it: GOAWAY ENHANCE_YOUR_CALM.
MAX_HEADER_BLOCK = 2 * MAX_HEADER_LIST
# Answers the peer makes us queue (PING and SETTINGS ACKs, RST_STREAM) while it does not read: our
# write buffer is above its high-water mark. A real peer has a handful in flight; 17 bytes each, so
# this bounds them at ~170 KiB. Past it: GOAWAY ENHANCE_YOUR_CALM (Envoy's max_outbound_control_frames
# is 1000 for the same purpose).
MAX_UNREAD_CONTROL = 10_000
CLOSE_LINGER = 1.0  # seconds a closing connection's last frames (its GOAWAY) get to leave before it is cut


class ResetBudget:
    """Counts the streams a peer opens and those it resets before we answered them (rapid reset,
    CVE-2023-44487: each would cost an upstream connect). Over budget when, within one window of
    ``WINDOW`` seconds, more than ``FLOOR`` streams were reset early and they are more than half of the
    streams opened (as Envoy's premature-reset rule): a client that gives up while a connect is slow is
    normal, half of all streams is not."""

    WINDOW = 10.0  # seconds: counts start afresh, so a long-lived tunnel is judged on recent behaviour
    FLOOR = 100  # early resets always tolerated per window (browsers cancel; ~10 connects/s at most)

    __slots__ = ("early", "opened", "since")

    def __init__(self, now: float) -> None:
        self.since = now
        self.opened = 0
        self.early = 0

    def _window(self, now: float) -> None:
        if now - self.since > self.WINDOW:
            self.since, self.opened, self.early = now, 0, 0

    def open(self, now: float) -> None:
        self._window(now)
        self.opened += 1

    def reset_early(self, now: float) -> bool:
        """A stream was reset before it was answered; True once the peer is over budget."""
        self._window(now)
        self.early += 1
        return self.early > self.FLOOR and 2 * self.early > self.opened


class HeaderBlockGuard:
    """Follows the frame headers of what a peer sends (never the payloads) and measures each header
    block while it is open, so a block can be refused before h2 has buffered it (see MAX_HEADER_BLOCK).

    Pure: ``feed`` the received bytes in order; it returns False once a block is over ``limit``. The
    cost is one step per frame, not per byte: a DATA frame's payload is skipped by counting."""

    PREFACE = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n": a server receives it before the first frame
    HEADERS, PUSH_PROMISE, CONTINUATION = 0x1, 0x5, 0x9
    END_HEADERS = 0x4

    __slots__ = ("block", "head", "limit", "skip")

    def __init__(self, limit: int, server: bool) -> None:
        self.limit = limit
        self.skip = self.PREFACE if server else 0  # payload bytes of the current frame still to come
        self.head = b""  # a frame header split across reads (under 9 bytes)
        self.block = -1  # encoded bytes of the open header block; -1: none open

    def feed(self, data: bytes) -> bool:
        """Account ``data``; False when a header block has grown past the limit."""
        pos, end = 0, len(data)
        if self.skip >= end:  # the common case: the middle of a large DATA frame
            self.skip -= end
            return True
        while True:
            pos += self.skip
            if pos >= end:
                self.skip = pos - end
                return True
            self.skip = 0
            if self.head:
                head = self.head + data[pos:pos + 9 - len(self.head)]
                pos += 9 - len(self.head)
            else:
                head = data[pos:pos + 9]
                pos += 9
            if len(head) < 9:
                self.head = head
                return True
            self.head = b""
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            if kind in (self.HEADERS, self.PUSH_PROMISE) or (kind == self.CONTINUATION and self.block >= 0):
                self.block = max(self.block, 0) + length
                if self.block > self.limit:
                    return False
                if flags & self.END_HEADERS:
                    self.block = -1
            else:
                self.block = -1  # anything else inside a block is h2's protocol error to raise
            self.skip = length
