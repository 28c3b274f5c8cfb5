"""This gate's mesh trust material, read once and checked with located problems, and the two questions
asked of it: which TLS context to use (gate.mesh.tls) and which configured peer a gate is (gate.mesh.peers,
where the rule is written down).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from gate.config import MeshSpec, PeerSpec
from gate.errors import ConfigError
from gate.mesh import tls
from gate.mesh.identity import Identity, id_of_certificate, load_identity
from gate.mesh.peers import Peers, Presented
from gate.mesh.session import ALPN_H2, ALPN_REVERSE

__all__ = ["PeerCheck", "Trust"]


@dataclass(frozen=True)
class PeerCheck:
    """What a dialled peer's certificate must satisfy: the same rule an accepted gate passes."""

    peer: PeerSpec
    policy: Peers

    def verify(self, der: bytes | None) -> str:
        """The peer's ID, or ssl.SSLError saying why it is not the gate we meant to reach."""
        if der is None:
            raise ssl.SSLError(f"peer {self.peer.name} presented no certificate")
        cert = Presented.of(der)
        reason = self.policy.why_not(self.peer, cert)
        if reason is not None:
            raise ssl.SSLError(f"peer {self.peer.name} {reason}")
        return cert.id


def _pem(path: Path, where: str, problems: list[str]) -> str:
    """The certificates in ``path`` as PEM text, checked the way the ssl module will load them."""
    if path.is_dir():
        problems.append(f"{where}: {path} is a directory, not a PEM certificate file")
        return ""
    try:
        text = path.read_text()
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError):  # (SSLError is an OSError; UnicodeDecodeError a ValueError)
        problems.append(f"{where}: {path} holds no PEM certificate")
        return ""
    except OSError as e:
        problems.append(f"{where}: {path}: {e.strerror}")
        return ""
    return text


class Trust:
    """This gate's identity, the anchors it trusts, and the peer rule; ConfigError (every problem, located)
    when a file is missing, unreadable, or says something else than the config."""

    def __init__(self, mesh: MeshSpec, peers: tuple[PeerSpec, ...]) -> None:
        self.mesh = mesh
        self.peers = peers
        problems: list[str] = []
        self.identity: Identity = self._identity(mesh.identity, problems)
        self._ca = _pem(mesh.ca, "mesh.ca", problems) if mesh.ca is not None else ""
        self._certs: dict[str, str] = {}  # peer name -> PEM of its cert:
        cert_ids: dict[str, str] = {}
        for i, peer in enumerate(peers):
            if peer.cert is None:
                continue
            pem = _pem(peer.cert, f"peers[{i}].cert", problems)
            if not pem:
                continue
            ident = id_of_certificate(ssl.PEM_cert_to_DER_cert(pem))
            if peer.id is not None and peer.id != ident:
                problems.append(f"peers[{i}].cert: {peer.cert} has ID {ident}, not the configured id {peer.id}")
            self._certs[peer.name], cert_ids[peer.name] = pem, ident
        pinned = [(i, cert_ids.get(p.name, p.id)) for i, p in enumerate(peers)]
        for i, key_id in pinned:
            if key_id is not None and any(other == key_id for _, other in pinned[:i]):
                problems.append(f"peers[{i}]: gate {key_id} is configured twice (one gate, one peer entry)")
        if problems:
            raise ConfigError(problems)
        self.policy = Peers(peers, cert_ids, mesh.trust_domain, has_ca=mesh.ca is not None)
        # pinned ID -> peer, for peers known by key (id: or cert:)
        self.by_id = {ident: peer for (_, ident), peer in zip(pinned, peers, strict=True) if ident is not None}

    @staticmethod
    def _identity(directory: Path, problems: list[str]) -> Identity:
        if not directory.is_dir():
            problems.append(f"mesh.identity: {directory} is not a directory (create one: ugate keygen --dir "
                            f"{directory})")
            return Identity(directory / "key.pem", directory / "cert.pem", "", "", None)
        try:
            return load_identity(directory)
        except ConfigError as e:
            problems.extend(f"mesh.identity: {problem}" for problem in e.problems)
            return Identity(directory / "key.pem", directory / "cert.pem", "", "", None)

    def server_context(self) -> ssl.SSLContext:
        """For h2 listeners; ConfigError when no gate could ever be accepted."""
        anchors = "\n".join(filter(None, (self._ca, *self._certs.values())))
        if not anchors:
            raise ConfigError(["mesh: an h2 listener needs mesh.ca or peers with cert: to authenticate gates"])
        return tls.server_context(self.identity, anchors, [ALPN_H2, ALPN_REVERSE])

    def client_context(self, peer: PeerSpec, reverse: bool = False) -> tuple[ssl.SSLContext, PeerCheck]:
        """The context for dialling ``peer`` (to offer it a reverse tunnel with ``reverse``) and the check
        its certificate must pass after the handshake."""
        alpn = [ALPN_REVERSE if reverse else ALPN_H2]
        if peer.cert is not None or peer.id is None:  # its cert, or (no pin at all) the CA, verifies the chain
            anchors = "\n".join(filter(None, (self._ca, self._certs.get(peer.name, ""))))
            return tls.client_context(self.identity, anchors, alpn), PeerCheck(peer, self.policy)
        return tls.client_context(self.identity, None, alpn), PeerCheck(peer, self.policy)

    def cert_pem(self, peer: str) -> str:
        """The pinned certificate of ``peer`` as read at load ("" without one): a reload compares it."""
        return self._certs.get(peer, "")

    def inbound_peer(self, der: bytes | None) -> tuple[str, PeerSpec | None]:
        """The ID of a gate that passed the TLS handshake, and the configured peer it is (if any)."""
        return self.policy.identify(der)
