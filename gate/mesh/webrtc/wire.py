"""What WebRTC peers say to each other, as pure codecs: the signaling messages (offer / answer), the
session description checks made before aiortc sees one, the flow metadata in a channel's label, and the
control messages on a flow's channel. No sockets, no aiortc: bytes or text in, frozen results out.

Signaling (one JSON object, UTF-8, over the authenticated HTTP/2 exchange): ``{"v": 1, "gate": ID,
"sdp": SDP}`` (offer or answer) or ``{"v": 1, "error": REASON}`` (the answerer refuses). ``gate`` binds
the description, and so its DTLS fingerprint, to the gate ID that the mesh's TLS authenticated; a relayed
one also carries ``key`` and ``sig``, the sender's seal (gate.mesh.webrtc.seal).

A flow's channel carries binary messages (the bytes) and text messages (control):
``ok`` (the far gate connected the flow), ``err STATUS REASON`` (it could not: the HTTP/2 transport's
status and reason, so errors map back the same way), ``eof`` (the sender half-closed), ``ack N`` (the
receiver wrote N more bytes to its socket: the sender's window opens by N). A UDP flow's channel
(gate.mesh.webrtc.udp) carries one datagram per binary message and only ``ok`` / ``err``; its label is
marked as the HTTP/2 transport marks CONNECT-UDP (``:protocol connect-udp``, the destination in ``:path``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gate.errors import ClientProtocolError
from gate.mesh.h2_streams import meta_headers, meta_of, udp_path
from gate.mesh.session import CONNECT_UDP
from gate.mesh.transport import FlowMeta

__all__ = ["MAX_CANDIDATES", "MAX_CONTROL", "MAX_LABEL", "MAX_SIGNAL", "Ack", "Control", "Eof", "Ok", "Refused",
           "Sdp", "SignalError", "SignalMessage", "check_sdp", "decode_signal", "encode_signal", "label_of",
           "meta_of_label", "parse_control", "parse_label"]

# An offer with host candidates of a few interfaces is 1-2 KB; 16 KB leaves room for many candidates
# and is what the answerer reads at most before it refuses (an exchange cannot make it buffer more).
MAX_SIGNAL = 16 << 10
MAX_CANDIDATES = 32  # candidates in one description: each costs a connectivity check; a host has a few
MAX_LABEL = 4096  # a label is the flow's metadata (host names <= 255, <= 16 ALPN ids): 4 KB is ample
MAX_CONTROL = 64  # the longest control message is "err 504 unreachable"
VERSION = 1
_FINGERPRINT = re.compile(r"^a=fingerprint:(sha-256|sha-384|sha-512) ((?:[0-9A-Fa-f]{2}:){31,63}[0-9A-Fa-f]{2})$")
_DIGEST_PAIRS = {"sha-256": 32, "sha-384": 48, "sha-512": 64}


class SignalError(ValueError):
    """A signaling message or session description we do not accept (said back to the sender)."""


@dataclass(frozen=True, slots=True)
class Sdp:
    """The facts of a session description we check: one data-channel section, its DTLS fingerprint."""

    fingerprint: str  # sha-256, upper-case hex pairs joined by ':'
    candidates: int


@dataclass(frozen=True, slots=True)
class SignalMessage:
    """An offer or an answer (``sdp``), or the answerer's refusal (``error``)."""

    gate: str = ""
    sdp: str = ""
    error: str = ""
    key: str = ""  # relayed: the seal (gate.mesh.webrtc.seal), base64
    sig: str = ""


def encode_signal(message: SignalMessage) -> bytes:
    body: dict[str, object] = {"v": VERSION}
    if message.error:
        body["error"] = message.error[:200]
    else:
        body.update(gate=message.gate, sdp=message.sdp)
        if message.key or message.sig:
            body.update(key=message.key, sig=message.sig)
    return json.dumps(body).encode()


def decode_signal(data: bytes) -> SignalMessage:
    """The message in ``data`` (complete: the exchange delivers whole bodies); SignalError if it is not one."""
    if len(data) > MAX_SIGNAL:
        raise SignalError(f"signaling message over {MAX_SIGNAL} bytes")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SignalError("signaling message is not JSON") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise SignalError("not a version 1 signaling message")
    error = body.get("error")
    if error is not None:
        if not isinstance(error, str):
            raise SignalError("error is not a string")
        return SignalMessage(error=error[:200] or "refused")
    gate, sdp = body.get("gate"), body.get("sdp")
    if not isinstance(gate, str) or not isinstance(sdp, str) or not gate or not sdp:
        raise SignalError("gate and sdp must be non-empty strings")
    key, sig = body.get("key", ""), body.get("sig", "")
    if not isinstance(key, str) or not isinstance(sig, str):
        raise SignalError("key and sig must be strings")
    return SignalMessage(gate=gate, sdp=sdp, key=key, sig=sig)


def check_sdp(sdp: str) -> Sdp:
    """What aiortc is given must be a data-channel-only description with exactly one sha-256 fingerprint
    (the one bound to the sender's gate ID; others of sha-384/512 may stand beside it, and aiortc
    requires every one to match) and a bounded number of candidates."""
    fingerprints: list[str] = []
    media = candidates = 0
    has_ufrag = has_pwd = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            media += 1
            if not line.startswith("m=application ") or "webrtc-datachannel" not in line:
                raise SignalError("only a data channel section is served")
        elif line.startswith("a=fingerprint:"):
            match = _FINGERPRINT.match(line)
            if match is None or len(match.group(2)) != 3 * _DIGEST_PAIRS[match.group(1)] - 1:
                raise SignalError("fingerprint is not sha-256, sha-384 or sha-512")
            if match.group(1) == "sha-256":
                fingerprints.append(match.group(2).upper())
        elif line.startswith("a=candidate:"):
            candidates += 1
        elif line.startswith("a=ice-ufrag:"):
            has_ufrag = True
        elif line.startswith("a=ice-pwd:"):
            has_pwd = True
    if media != 1:
        raise SignalError(f"{media} media sections (expected one data channel section)")
    if len(set(fingerprints)) != 1:
        raise SignalError(f"{len(set(fingerprints))} distinct sha-256 fingerprints (expected one)")
    if not (has_ufrag and has_pwd):
        raise SignalError("no ICE credentials")
    if candidates > MAX_CANDIDATES:
        raise SignalError(f"{candidates} candidates (at most {MAX_CANDIDATES})")
    return Sdp(fingerprints[0], candidates)


def label_of(meta: FlowMeta, udp: bool = False) -> str:
    """The channel label carrying ``meta``: the HTTP/2 transport's CONNECT headers, as a JSON object
    (``udp``: its CONNECT-UDP headers, for a UDP flow's channel)."""
    head = {":method": "CONNECT", ":authority": str(meta.dst)}
    if udp:
        head.update({":protocol": CONNECT_UDP, ":path": udp_path(meta.dst)})
    return json.dumps({**head, **dict(meta_headers(meta))}, separators=(",", ":"))


def parse_label(label: str) -> tuple[FlowMeta, bool]:
    """The flow a channel label carries, and whether it is a UDP flow; ClientProtocolError when it
    carries none we serve."""
    if len(label) > MAX_LABEL:
        raise ClientProtocolError(f"channel label over {MAX_LABEL} characters")
    try:
        headers = json.loads(label)
    except ValueError:
        raise ClientProtocolError("channel label is not JSON") from None
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ClientProtocolError("channel label is not an object of strings")
    return meta_of(headers), headers.get(":protocol") == CONNECT_UDP


def meta_of_label(label: str) -> FlowMeta:
    """The flow a channel label carries; ClientProtocolError when it carries none we serve."""
    return parse_label(label)[0]


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass(frozen=True, slots=True)
class Refused:
    status: str
    reason: str


@dataclass(frozen=True, slots=True)
class Eof:
    pass


@dataclass(frozen=True, slots=True)
class Ack:
    count: int


Control = Ok | Refused | Eof | Ack


def parse_control(text: str) -> Control:
    """A control message; ClientProtocolError if ``text`` is none."""
    if len(text) > MAX_CONTROL:
        raise ClientProtocolError("control message too long")
    if text == "ok":
        return Ok()
    if text == "eof":
        return Eof()
    word, _, rest = text.partition(" ")
    if word == "ack" and rest.isascii() and rest.isdigit() and len(rest) <= 10:
        return Ack(int(rest))
    if word == "err":
        status, _, reason = rest.partition(" ")
        if len(status) == 3 and status.isascii() and status.isdigit():
            return Refused(status, reason)
    raise ClientProtocolError(f"bad control message {text[:16]!r}")
