"""The WireGuard signalling message: one JSON object (UTF-8) sent as a mesh exchange of kind ``wireguard``
(gate.mesh.h2_exchange), the offer in the request and the answer in the response. Pure codec.

``{"v": 1, "to": GATE_ID, "from": GATE_ID|null, "key": WG_PUBLIC_KEY, "ufrag": ..., "pwd": ...,
"candidates": ["candidate SDP", ...]}``. ``to`` names the gate the offer is for (a relay forwards it
there); ``from`` is written by a relay, which alone can vouch for who sent it (its mesh tunnel
authenticated the sender), and is ignored from anyone else. ``key`` is the sender's WireGuard public key:
taken only from a gate the mesh authenticated (directly or through a configured relay).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from gate.validate import gate_id
from gate.wireguard.wgtool import public_key_ok

__all__ = ["KIND", "MAX_CANDIDATES", "MAX_MESSAGE", "Signal", "SignalError", "decode", "encode"]

KIND = "wireguard"  # the mesh exchange kind
VERSION = 1
MAX_MESSAGE = 16 << 10  # bytes: 32 candidates of <= 256 characters and the rest fit in well under this
MAX_CANDIDATES = 32  # host + srflx per address: a handful; more is a peer making us pair (and probe) junk
MAX_CANDIDATE = 256  # characters of one candidate line (aioice writes about 80)
MAX_CREDENTIAL = 256  # ICE ufrag/pwd (RFC 8445: at most 256 characters)


class SignalError(ValueError):
    """Not a signalling message we accept."""


@dataclass(frozen=True)
class Signal:
    to: str
    key: str
    ufrag: str
    pwd: str
    candidates: tuple[str, ...]
    sender: str | None = None  # "from": set by a relay

    def via_relay(self, sender: str) -> Signal:
        return replace(self, sender=sender)


def encode(signal: Signal) -> bytes:
    return json.dumps({"v": VERSION, "to": signal.to, "from": signal.sender, "key": signal.key,
                       "ufrag": signal.ufrag, "pwd": signal.pwd, "candidates": list(signal.candidates)},
                      separators=(",", ":")).encode()


def _text(obj: dict[str, object], key: str, limit: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise SignalError(f"{key}: expected a string of 1..{limit} characters")
    return value


def decode(data: bytes) -> Signal:
    """The message in ``data`` (whole: exchanges deliver complete bodies); SignalError if it is not one."""
    if len(data) > MAX_MESSAGE:
        raise SignalError(f"over {MAX_MESSAGE} bytes")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SignalError(f"not JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise SignalError(f"not a version {VERSION} object")
    try:
        to = gate_id(obj.get("to"))
        sender = None if obj.get("from") is None else gate_id(obj.get("from"))
    except (ValueError, TypeError) as e:
        raise SignalError(str(e)) from None
    key = _text(obj, "key", 44)
    if not public_key_ok(key):
        raise SignalError("key: not a WireGuard public key (base64 of 32 bytes)")
    candidates = obj.get("candidates")
    if not isinstance(candidates, list) or len(candidates) > MAX_CANDIDATES or not all(
            isinstance(c, str) and 0 < len(c) <= MAX_CANDIDATE for c in candidates):
        raise SignalError(f"candidates: expected at most {MAX_CANDIDATES} strings of <= {MAX_CANDIDATE} characters")
    return Signal(to=to, key=key, ufrag=_text(obj, "ufrag", MAX_CREDENTIAL), pwd=_text(obj, "pwd", MAX_CREDENTIAL),
                  candidates=tuple(candidates), sender=sender)
