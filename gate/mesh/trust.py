"""Mutual TLS between gates: the contexts both ends use, and who the other end is.

TLS 1.3 only, ALPN h2, both sides present their certificate. A peer is trusted when:
- its certificate is configured (``peers[].cert``, self-signed gates): it is a trust anchor, and its
  ID is then pinned as well;
- or a mesh CA signed it (``mesh.ca``) and its spiffe:// URI SAN is in our trust domain;
- or, when we dial a peer pinned by ``id`` alone, the certificate's key hashes to that ID (the stdlib
  TLS stack verifies certificates only against trust anchors, so for that case the client accepts the
  chain unverified and checks the key's ID right after the handshake, before any stream is opened).
Inbound, a TLS client must pass the first two checks (it has no pinned-ID path: the server has no way
to ask for a certificate it does not already trust); its ID then selects its ``allow`` list.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from gate.config import MeshSpec, PeerSpec
from gate.errors import ConfigError
from gate.mesh.identity import Identity, id_of_certificate, load_identity, spiffe_uri_of
from gate.mesh.session import ALPN_H2, ALPN_REVERSE

__all__ = ["PeerCheck", "Trust"]


@dataclass(frozen=True)
class PeerCheck:
    """What a dialled peer's certificate must satisfy."""

    peer: str
    id: str | None
    trust_domain: str | None  # CA-verified: the URI SAN must be spiffe://trust_domain/...

    def verify(self, der: bytes | None) -> str:
        """The peer's ID, or ssl.SSLError saying why it is not the gate we meant to reach."""
        if der is None:
            raise ssl.SSLError(f"peer {self.peer} presented no certificate")
        got = id_of_certificate(der)
        if self.id is not None and got != self.id:
            raise ssl.SSLError(f"peer {self.peer} has ID {got}, expected {self.id}")
        if self.id is None and self.trust_domain is not None:
            uri = spiffe_uri_of(der) or ""
            if not uri.startswith(f"spiffe://{self.trust_domain}/"):
                raise ssl.SSLError(f"peer {self.peer} certificate URI {uri or '(none)'} is not in {self.trust_domain}")
        return got


class Trust:
    """This gate's identity and the TLS contexts for dialling peers and accepting them."""

    def __init__(self, mesh: MeshSpec, peers: tuple[PeerSpec, ...]) -> None:
        self.mesh = mesh
        self.identity: Identity = load_identity(mesh.identity)
        self.peers = peers
        self.pinned_certs: dict[str, str] = {}  # ID -> peer name, for peers configured by certificate
        anchors: list[str] = []
        for peer in peers:
            if peer.cert is None:
                continue
            try:
                pem = peer.cert.read_text()
                der = ssl.PEM_cert_to_DER_cert(pem)
            except (OSError, ValueError) as e:
                raise ConfigError([f"peers {peer.name}: cert {peer.cert}: {e}"]) from e
            ident = id_of_certificate(der)
            if peer.id is not None and peer.id != ident:
                raise ConfigError([f"peers {peer.name}: cert {peer.cert} has ID {ident}, not the configured {peer.id}"])
            self.pinned_certs[ident] = peer.name
            anchors.append(pem)
        self._anchors = "\n".join(anchors)
        self.by_id = {p.id: p for p in peers if p.id is not None}
        by_name = {p.name: p for p in peers}
        self.by_id.update({ident: by_name[name] for ident, name in self.pinned_certs.items()})

    def _base(self, purpose: ssl.Purpose, alpn: list[str]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(alpn)
        ctx.load_cert_chain(self.identity.cert_file, self.identity.key_file)
        return ctx

    def _load_anchors(self, ctx: ssl.SSLContext, peer: PeerSpec | None = None) -> bool:
        loaded = False
        if self.mesh.ca is not None:
            ctx.load_verify_locations(cafile=str(self.mesh.ca))
            loaded = True
        pem = self._anchors if peer is None else (peer.cert.read_text() if peer.cert else "")
        if pem:
            ctx.load_verify_locations(cadata=pem)
            loaded = True
        return loaded

    def server_context(self) -> ssl.SSLContext:
        ctx = self._base(ssl.Purpose.CLIENT_AUTH, [ALPN_H2, ALPN_REVERSE])
        if not self._load_anchors(ctx):
            raise ConfigError(["mesh: an h2 listener needs mesh.ca or peers with cert: to authenticate gates"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, peer: PeerSpec, reverse: bool = False) -> tuple[ssl.SSLContext, PeerCheck]:
        """The context for dialling ``peer`` (to offer it a reverse tunnel with ``reverse``) and the check
        its certificate must pass after the handshake."""
        ctx = self._base(ssl.Purpose.SERVER_AUTH, [ALPN_REVERSE if reverse else ALPN_H2])
        ctx.check_hostname = False  # gates are named by key ID, not by the address we dial
        if peer.cert is not None or (peer.id is None and self.mesh.ca is not None):
            self._load_anchors(ctx, peer)
            ctx.verify_mode = ssl.CERT_REQUIRED
            return ctx, PeerCheck(peer.name, peer.id, self.mesh.trust_domain if peer.cert is None else None)
        ctx.verify_mode = ssl.CERT_NONE  # pinned by ID alone: checked by PeerCheck.verify instead
        return ctx, PeerCheck(peer.name, peer.id, None)

    def inbound_peer(self, der: bytes | None) -> tuple[str, PeerSpec | None]:
        """The ID of a gate that passed the TLS handshake, and its configured peer entry (if any)."""
        if der is None:
            return "", None
        ident = id_of_certificate(der)
        peer = self.by_id.get(ident)
        if peer is None and self.mesh.ca is not None:
            uri = spiffe_uri_of(der) or ""
            if not uri.startswith(f"spiffe://{self.mesh.trust_domain}/"):
                return ident, None
        return ident, peer
