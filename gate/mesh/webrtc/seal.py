"""End-to-end seals on relayed signaling: the offer and the answer signed with the gates' identity keys.

A direct exchange is bound to the sender's gate ID by the mesh's TLS. A relayed one (gate.mesh.h2_exchange)
crosses a third gate, which vouches for the sender but could otherwise swap the DTLS fingerprint in the
description for its own and sit in the middle of the data channel. Sealed, it cannot: the sender signs
(its role, its ID, the receiver's ID, the description, and for an answer the SHA-256 of the offer it
answers) with the key its gate ID is the hash of, and sends the public key along; the receiver checks
that the key hashes to the ID it expects and that the signature holds. A seal for another receiver, an
offer passed off as an answer, or an answer replayed for another offer does not verify.

Pure: keys and bytes in, a seal or SignalError out (no sockets, no clock).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from gate.mesh.identity import gate_id
from gate.mesh.webrtc.wire import SignalError

__all__ = ["MAX_SEAL_FIELD", "Seal", "Sealer", "check_seal"]

CONTEXT = b"ugate webrtc signal v1"  # signatures made for anything else never verify as these
# An SPKI of an RSA-4096 key is 550 bytes, its signature 512: base64 of either stays under 1 KiB
MAX_SEAL_FIELD = 1024
Role = Literal["offer", "answer"]


@dataclass(frozen=True, slots=True)
class Seal:
    key: str  # the signer's public key, SubjectPublicKeyInfo DER, base64
    sig: str  # its signature over ``_signed``, base64


def _signed(role: Role, sender: str, receiver: str, sdp: str, offer_sdp: str) -> bytes:
    answered = hashlib.sha256(offer_sdp.encode()).hexdigest() if role == "answer" else ""
    return b"\0".join([CONTEXT, role.encode(), sender.encode(), receiver.encode(), answered.encode(), sdp.encode()])


class Sealer:
    """This gate's signing half: its identity key."""

    def __init__(self, key: PrivateKeyTypes) -> None:
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
            raise ValueError(f"cannot sign with a {type(key).__name__}")
        self.key = key
        self.spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    @classmethod
    def load(cls, key_file: Path) -> Sealer:
        return cls(serialization.load_pem_private_key(key_file.read_bytes(), password=None))

    def seal(self, role: Role, sender: str, receiver: str, sdp: str, offer_sdp: str = "") -> Seal:
        data = _signed(role, sender, receiver, sdp, offer_sdp)
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            sig = self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(self.key, rsa.RSAPrivateKey):
            sig = self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        else:
            sig = self.key.sign(data)
        return Seal(base64.b64encode(self.spki).decode(), base64.b64encode(sig).decode())


def check_seal(seal: Seal, role: Role, sender: str, receiver: str, sdp: str, offer_sdp: str = "") -> None:
    """SignalError unless ``seal`` is gate ``sender``'s signature of this ``role`` for ``receiver``."""
    if not seal.key or not seal.sig:
        raise SignalError(f"the {role} is not sealed")
    if len(seal.key) > MAX_SEAL_FIELD or len(seal.sig) > MAX_SEAL_FIELD:
        raise SignalError("seal fields too long")
    try:
        spki, sig = base64.b64decode(seal.key, validate=True), base64.b64decode(seal.sig, validate=True)
        key = serialization.load_der_public_key(spki)
    except (binascii.Error, ValueError, UnsupportedAlgorithm):
        raise SignalError("the seal's key is not a public key") from None
    if gate_id(key) != sender:
        raise SignalError(f"the {role} is sealed by gate {gate_id(key)}, not {sender[:60]}")
    data = _signed(role, sender, receiver, sdp, offer_sdp)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
        else:
            raise SignalError(f"cannot check a seal made with a {type(key).__name__}")
    except InvalidSignature:
        raise SignalError(f"the {role}'s seal does not verify") from None
