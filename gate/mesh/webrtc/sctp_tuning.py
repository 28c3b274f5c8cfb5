"""The one place where ugate changes aiortc's data-channel behaviour (pinned to aiortc 1.16): delayed
SACKs, and SCTP packets larger than the 1,189 bytes aiortc assumes, for one peer connection at a time.

Why: stock aiortc makes every ~1,160-byte chunk one SCTP packet, one DTLS record, one ``sendto`` and one
SACK back, so a data channel runs at about 10 MB/s on loopback whatever the path. The levers, all per
peer connection, never process-wide:

- ``tune(pc)`` (every ugate peer connection, once connected): the association SACKs every SACK_EVERY
  DATA packets, or SACK_DELAY after the first unacknowledged one, whichever comes first (a gap or a
  duplicate is still SACKed at once); and, when the route to the peer could carry larger packets, the
  DTLS layer reads and writes whole records up to MAX_PACKET, so this end can receive them. A browser
  or plain aiortc peer sees an ordinary association (aiortc's own sending, a SACK per 4 packets at
  most): the standard path interoperates.
- ``use_packet(pc, size)`` (once the far end announced, on the link's control channel, that it receives
  ``size``-byte packets: only a ugate peer does): packets grow to ``size`` bounded by clamp_packet (the
  route's MTU, only above Ethernet's; the DTLS record), SACKs go to every SACK_EVERY_UGATE packets and
  the sending burst to BURST. aiortc keeps the packet size in a module constant (``USERDATA_MAX_LENGTH``)
  that four methods read: the association's class is swapped for a subclass whose copies of exactly
  those methods (aiortc's own code objects, not copied source) read it from an overlay of the module's
  globals. Other connections are untouched.

Any other aiortc version: nothing is patched (a log line says so) and every connection stays stock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import types
from dataclasses import dataclass
from typing import Any

import aiortc
from aiortc import RTCPeerConnection
from aiortc import rtcsctptransport as sctp_module
from aiortc.rtcsctptransport import RTCSctpTransport

__all__ = ["AIORTC_VERSION", "BURST", "MAX_PACKET", "PATCHED", "SACK_DELAY", "SACK_EVERY", "SACK_EVERY_UGATE",
           "STANDARD_PACKET", "Announcement", "BadAnnouncement", "announcement", "clamp_packet", "message_size",
           "packet_size", "parse_announcement", "path_mtu", "receive_limit", "tune", "tuned", "use_packet"]

log = logging.getLogger("ugate")

AIORTC_VERSION = "1.16.0"  # the version whose internals this module was read against and tested with
PATCHED = aiortc.__version__ == AIORTC_VERSION
if not PATCHED:
    log.warning("webrtc: aiortc %s is not %s: data channels run stock (no delayed SACK, no large packets)",
                aiortc.__version__, AIORTC_VERSION)

STANDARD_PACKET = sctp_module.SCTP_MAX_PACKET_LENGTH if PATCHED else 1189  # aiortc's: fits IPv6's minimum MTU
# One SCTP packet is one DTLS record, whose plaintext is at most 2^14 bytes (RFC 6347 4.1): the largest
# packet that can be negotiated, whatever a peer announces.
MAX_PACKET = 1 << 14
# What a packet costs on the wire on top of its SCTP bytes, at worst: IPv6 (40) + UDP (8) + a DTLS 1.2 record
# header (13) + a CBC cipher's IV (16), HMAC-SHA384 (48) and padding (16) = 141, rounded up (AES-GCM costs 24).
PATH_OVERHEAD = 160
# The kernel knows the first hop's MTU (and lowers it only after an ICMP, i.e. after a loss): a route of
# 1,500 or less may cross smaller links further on (PPPoE, tunnels), so larger packets are only used on
# routes that are larger to begin with (loopback, jumbo frames), where the peers chose that path.
ETHERNET_MTU = 1500
# DATA packets per SACK. RFC 9260 6.2 says a receiver SHOULD SACK at least every second packet; 4 (with
# SACK_DELAY bounding the wait) measured faster on loopback than 2 (and 2 than 1), and matches aiortc's
# sending burst of 4 packets per SACK, so a stock sender is never starved.
SACK_EVERY = 4
# Toward a peer that announced (a ugate peer, so a tuned sender): SACK every 8th packet; and as a sender,
# send up to BURST packets per SACK (aiortc's limit is 4, RFC 9260's Max.Burst default) so that such a
# SACK is answered in full. Half the SACKs again, each costing about what receiving a DATA packet costs
# (on loopback a sendto runs the receiver's side too); measured: about 20% less CPU per byte than
# every 4th, no clear gain from 16 or 32.
SACK_EVERY_UGATE = 8
# A SACK owed for fewer packets waits this long (RFC 9260 6.2: at most 200 ms; Linux and usrsctp wait
# 200 ms): long enough for the rest of a burst to arrive (a SACK at the end of each turn of the event
# loop still came every ~2 packets, its batches are small), short against aiortc's 1 s minimum RTO and
# the sender's wait when its window is smaller than a SACK's worth (only at start or after a timeout).
SACK_DELAY = 0.002
BURST = SACK_EVERY_UGATE
_SCTP_HEADERS = sctp_module.SCTP_COMMON_HEADER_LENGTH + sctp_module.SCTP_DATA_CHUNK_HEADER_LENGTH if PATCHED else 28



def _local_cap() -> int:
    """UGATE_WEBRTC_MAX_PACKET: the largest packet this gate sends or announces (default MAX_PACKET; the
    standard size, 1189, turns large packets off). A diagnostic and benchmarking switch, not configuration."""
    try:
        return int(os.environ.get("UGATE_WEBRTC_MAX_PACKET", MAX_PACKET))
    except ValueError:
        return MAX_PACKET


LOCAL_CAP = _local_cap()
_IP_MTU, _IPV6_MTU = 14, 24  # linux/in.h, linux/in6.h: a connected socket's route MTU (not in Python's socket)
_DTLS_READ = MAX_PACKET + 1024  # a whole record and its header, expansion and padding (OpenSSL's own margin)


# -- the announcement (pure): "packet N" on the link's control channel, N the largest SCTP packet the sender
# of it accepts. Only a ugate peer sends it; one that never does keeps the standard size both ways.

ANNOUNCE_MAX = 24  # "packet " and up to 10 digits, with room: a longer text is not an announcement


class BadAnnouncement(ValueError):
    """A control-channel message that is not an announcement (the peer broke the protocol)."""


@dataclass(frozen=True, slots=True)
class Announcement:
    packet: int  # as announced: clamp_packet bounds it before use


def announcement(packet: int) -> str:
    return f"packet {packet}"


def parse_announcement(text: str) -> Announcement:
    """The announcement in ``text``; BadAnnouncement if it is none."""
    if len(text) > ANNOUNCE_MAX:
        raise BadAnnouncement("control message too long")
    word, _, number = text.partition(" ")
    if word != "packet" or not (number.isascii() and number.isdigit()) or len(number) > 10:
        raise BadAnnouncement(f"not an announcement: {text[:16]!r}")
    return Announcement(int(number))


def clamp_packet(announced: int, path: int) -> int:
    """The SCTP packet size to send with: what the far end announced it can receive, bounded by what the
    path carries and by MAX_PACKET, never below the standard size (an absurd announcement changes nothing
    beyond those bounds). A route of ETHERNET_MTU or less keeps the standard size."""
    if path <= ETHERNET_MTU:
        return STANDARD_PACKET
    return max(STANDARD_PACKET, min(announced, path - PATH_OVERHEAD, MAX_PACKET, LOCAL_CAP))


def path_mtu(pc: RTCPeerConnection) -> int:
    """The kernel's MTU for the route to the peer's selected ICE address (the interface MTU, lowered by
    path MTU discovery when an ICMP said so): 65,536 on loopback, the link's on a LAN. 0 if unknown."""
    try:
        pairs = pc.sctp.transport.transport._connection._nominated  # type: ignore[union-attr]
        host = pairs[1].remote_addr[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # a connected UDP socket sends nothing: it only looks up the route
            if family == socket.AF_INET6:
                return probe.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU)
            return probe.getsockopt(socket.IPPROTO_IP, _IP_MTU)
    except (AttributeError, KeyError, IndexError, OSError):
        return 0


def receive_limit(pc: RTCPeerConnection) -> int:
    """The largest SCTP packet this end accepts from the peer (what it announces): the path's bound,
    MAX_PACKET, or the standard size when the connection is not tuned."""
    if not _large_records(pc):
        return STANDARD_PACKET
    return clamp_packet(MAX_PACKET, path_mtu(pc))


def _large_records(pc: RTCPeerConnection) -> bool:
    return tuned(pc) and isinstance(getattr(pc.sctp.transport, "_ssl", None), _LargeRecords)  # type: ignore[union-attr]


class _LargeRecords:
    """The DTLS connection with aiortc's 1,500-byte record reads (``recv(1500)``, ``bio_read(1500)``)
    raised to a whole record: larger packets arrive intact, and leave in one datagram."""

    __slots__ = ("_ssl",)

    def __init__(self, ssl: Any) -> None:
        self._ssl = ssl

    def recv(self, size: int) -> bytes:
        return self._ssl.recv(max(size, _DTLS_READ))  # type: ignore[no-any-return]

    def bio_read(self, size: int) -> bytes:
        return self._ssl.bio_read(max(size, _DTLS_READ))  # type: ignore[no-any-return]

    def send(self, data: bytes) -> int:
        return self._ssl.send(data)  # type: ignore[no-any-return]

    def bio_write(self, data: bytes) -> int:
        return self._ssl.bio_write(data)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ssl, name)


class _TunedSctp(RTCSctpTransport):
    """aiortc's association with delayed SACKs. Only ever set as an instance's class (no new state in
    ``__init__``: the attributes below are class defaults until first written)."""

    _ugate_packet = STANDARD_PACKET
    _ugate_unsacked = 0
    _ugate_sack_every = SACK_EVERY  # SACK_EVERY_UGATE once the peer announced
    _ugate_sack_handle: asyncio.TimerHandle | None = None

    async def _send_sack(self) -> None:
        # aiortc calls this after every datagram that carried DATA; SACK every SACK_EVERY of those, at
        # once when something is missing or duplicated, and otherwise after SACK_DELAY.
        self._ugate_unsacked += 1
        if self._ugate_unsacked >= self._ugate_sack_every or self._sack_misordered or self._sack_duplicates:
            await self._ugate_sack_now()
        elif self._ugate_sack_handle is None:
            self._ugate_sack_handle = asyncio.get_running_loop().call_later(SACK_DELAY, self._ugate_sack_later)

    async def _ugate_sack_now(self) -> None:
        self._ugate_unsacked = 0
        if self._ugate_sack_handle is not None:
            self._ugate_sack_handle.cancel()
            self._ugate_sack_handle = None
        await RTCSctpTransport._send_sack(self)

    def _ugate_sack_later(self) -> None:
        self._ugate_sack_handle = None
        if self._sack_needed and self._association_state == self.State.ESTABLISHED:
            task = asyncio.get_running_loop().create_task(self._ugate_sack_now())
            _sacks.add(task)
            task.add_done_callback(_sack_done)


_sacks: set[asyncio.Task[None]] = set()  # deferred SACKs being sent (held so they are not collected)


def _sack_done(task: asyncio.Task[None]) -> None:
    _sacks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("webrtc: deferred SACK not sent: %s", task.exception())  # the association is going away


@functools.cache
def _sized(packet: int) -> type[_TunedSctp]:
    """The tuned association class whose packets are ``packet`` bytes (one class per size, cached)."""
    userdata = (packet - _SCTP_HEADERS) // 4 * 4
    overlay = dict(vars(sctp_module), USERDATA_MAX_LENGTH=userdata)
    # _transmit reads the constant only for its burst limit, "4 * USERDATA_MAX_LENGTH": BURST packets
    burst = dict(vars(sctp_module), USERDATA_MAX_LENGTH=userdata * BURST // 4)
    methods: dict[str, object] = {"_ugate_packet": packet}
    for name, value in vars(RTCSctpTransport).items():
        if (isinstance(value, types.FunctionType) and "USERDATA_MAX_LENGTH" in value.__code__.co_names
                and name != "__init__"):  # (the swapped instance is built already)
            methods[name] = types.FunctionType(value.__code__, burst if name == "_transmit" else overlay,
                                               value.__name__, value.__defaults__, value.__closure__)
    return type(f"_TunedSctp{packet}", (_TunedSctp,), methods)


def tuned(pc: RTCPeerConnection) -> bool:
    return isinstance(pc.sctp, _TunedSctp)


def tune(pc: RTCPeerConnection) -> bool:
    """Delayed SACKs on ``pc`` (connected: DTLS is up), and large DTLS records when the route to the peer
    could carry large packets (elsewhere they would only cost a call per record). Safe toward any peer;
    does nothing (False) on another aiortc version or when the connection is not there."""
    if not PATCHED or pc.sctp is None or tuned(pc):
        return tuned(pc)
    dtls = pc.sctp.transport
    ssl = getattr(dtls, "_ssl", None)
    if ssl is None:
        return False
    if clamp_packet(MAX_PACKET, path_mtu(pc)) > STANDARD_PACKET and not isinstance(ssl, _LargeRecords):
        dtls._ssl = _LargeRecords(ssl)  # type: ignore[assignment]
    pc.sctp.__class__ = _sized(STANDARD_PACKET)
    return True


def use_packet(pc: RTCPeerConnection, size: int) -> int:
    """Send SCTP packets of ``size`` bytes (bounded by clamp_packet and this end's path) on a tuned
    connection, once the far end announced it receives them; returns the size in use."""
    if not tuned(pc):
        return STANDARD_PACKET
    assert pc.sctp is not None
    # (without large records, as on a route that could not carry them at tune(), a large packet would
    # leave truncated: aiortc's own reads of the DTLS output are 1,500 bytes)
    packet = clamp_packet(size, path_mtu(pc)) if _large_records(pc) else STANDARD_PACKET
    pc.sctp._ugate_sack_every = SACK_EVERY_UGATE  # type: ignore[attr-defined]  # (tuned)
    old = packet_size(pc)
    if packet != old:
        sctp = pc.sctp
        sctp.__class__ = _sized(packet)
        # aiortc's congestion window is counted in packets of the old size: start again from its initial 3
        sctp._cwnd = max(sctp._cwnd, 3 * (packet - _SCTP_HEADERS))
    return packet


def message_size(packet: int) -> int:
    """Bytes per data-channel message for packets of ``packet`` bytes: whole DATA chunks (aiortc sends one
    chunk per packet, so a message's short last fragment would cost a packet of its own), about 16 KiB
    (under every stack's default maximum message size, 64 KiB)."""
    userdata = (packet - _SCTP_HEADERS) // 4 * 4
    return userdata * max(1, (16 << 10) // userdata)


def packet_size(pc: RTCPeerConnection) -> int:
    """The SCTP packet size ``pc`` sends with."""
    sctp = pc.sctp
    return sctp._ugate_packet if isinstance(sctp, _TunedSctp) else STANDARD_PACKET
