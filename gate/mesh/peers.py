"""Which configured peer a gate is, decided from its certificate by one rule, whichever side dialled.

A certificate that passed the TLS handshake is the configured peer P when:
1. P has ``cert:`` -- the certificate's key ID is that certificate's ID (the file is P's trust anchor
   and pins its key; the trust domain is not asked, a self-signed gate has none to speak of);
2. P has ``id:`` (no cert) -- the key ID is P's id and, when the mesh has a CA, the spiffe URI is in
   ``mesh.trust_domain`` (in a CA mesh a pinned gate is still a member of that mesh);
3. P has neither (trusted through ``mesh.ca``) -- the spiffe URI is in ``mesh.trust_domain`` and names
   P: P's ``name`` is the gate ID (the URI's, which must be the key's) or ``ID.NAMESPACE.TRUST_DOMAIN``.
Dialling P, the certificate must pass P's rule (PeerCheck.verify); accepting, the gate is the peer whose
rule it passes (IDs are unique in a config, so at most one does), or nobody.

The TLS layer (gate.mesh.tls) decides only what may finish a handshake: dialling, P's cert or the CA
verify the chain (an ``id:``-only peer is checked by its key's ID alone); accepting, the CA and every
peer's cert are the anchors -- so a gate pinned by ``id:`` alone can dial us only if the CA signed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gate.config import PeerSpec
from gate.mesh.identity import id_of_certificate, spiffe_uri_of

__all__ = ["Peers", "Presented"]


@dataclass(frozen=True)
class Presented:
    """What a certificate says about its gate: the ID of its key and its spiffe URI (if any)."""

    id: str
    uri: str | None

    @classmethod
    def of(cls, der: bytes) -> Presented:
        return cls(id_of_certificate(der), spiffe_uri_of(der))

    def in_domain(self, trust_domain: str) -> bool:
        return (self.uri or "").startswith(f"spiffe://{trust_domain}/")

    def mesh_name(self, trust_domain: str) -> str | None:
        """``ID.NAMESPACE.TRUST_DOMAIN`` from a URI ``spiffe://TRUST_DOMAIN/ns/NAMESPACE/gate/ID`` whose ID is
        the key's, else None (a URI naming another key names nobody)."""
        if not self.in_domain(trust_domain):
            return None
        parts = (self.uri or "").removeprefix(f"spiffe://{trust_domain}/").split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "gate" or parts[3] != self.id or not parts[1]:
            return None
        return f"{self.id}.{parts[1]}.{trust_domain}"


class Peers:
    """The configured peers and the rule above. Pure: the certificates' IDs are read by the caller."""

    def __init__(self, peers: tuple[PeerSpec, ...], cert_ids: Mapping[str, str], trust_domain: str,
                 has_ca: bool) -> None:
        self.peers = peers
        self.cert_ids = dict(cert_ids)  # peer name -> ID of its cert: file
        self.trust_domain = trust_domain
        self.has_ca = has_ca

    def why_not(self, peer: PeerSpec, cert: Presented) -> str | None:
        """None when ``cert`` is ``peer``'s, else why not (worded to follow "peer NAME ")."""
        if peer.cert is not None:
            pinned = self.cert_ids[peer.name]
            return None if cert.id == pinned else f"has ID {cert.id}, expected {pinned} (its cert: {peer.cert})"
        if peer.id is not None and cert.id != peer.id:
            return f"has ID {cert.id}, expected {peer.id}"
        if (peer.id is None or self.has_ca) and not cert.in_domain(self.trust_domain):
            return f"certificate URI {cert.uri or '(none)'} is not in {self.trust_domain}"
        if peer.id is None:
            names = {cert.id, cert.mesh_name(self.trust_domain)}
            if peer.name not in names:
                return f"certificate names gate {cert.mesh_name(self.trust_domain) or cert.id}, not {peer.name}"
        return None

    def id_of(self, peer: PeerSpec) -> str | None:
        """``peer``'s gate ID as this config knows it (its cert:, its id:, or a CA-trusted peer's name),
        without its certificate at hand: how a relayed exchange names it (gate.mesh.h2_exchange)."""
        if peer.cert is not None:
            return self.cert_ids.get(peer.name)
        if peer.id is not None:
            return peer.id
        return peer.name.partition(".")[0] if self.has_ca else None

    def by_id(self, ident: str) -> PeerSpec | None:
        """The configured peer whose gate ID is ``ident`` (``id_of``'s inverse), or None."""
        return next((peer for peer in self.peers if self.id_of(peer) == ident), None) if ident else None

    def identify(self, der: bytes | None) -> tuple[str, PeerSpec | None]:
        """The ID of the gate holding this certificate, and the configured peer it is (None: a stranger)."""
        if der is None:
            return "", None
        cert = Presented.of(der)
        return cert.id, next((peer for peer in self.peers if self.why_not(peer, cert) is None), None)
