"""The TLS contexts of gate-to-gate tunnels: TLS 1.3, ALPN, our certificate, and which anchors verify the other end.

Who the other end is, once the handshake is done, is gate.mesh.peers' question; this module only builds
what the ssl module needs, from PEM text already read and checked (gate.mesh.trust).
"""

from __future__ import annotations

import ssl

from gate.mesh.identity import Identity

__all__ = ["client_context", "server_context"]


def _base(identity: Identity, server: bool, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(alpn)
    ctx.load_cert_chain(identity.cert_file, identity.key_file)
    return ctx


def server_context(identity: Identity, anchors: str, alpn: list[str]) -> ssl.SSLContext:
    """Accepting gates: a client certificate is required and must chain to ``anchors`` (PEM, not empty:
    the stdlib cannot accept a certificate it has no anchor for, so an ID pin alone cannot admit a gate)."""
    ctx = _base(identity, True, alpn)
    ctx.load_verify_locations(cadata=anchors)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(identity: Identity, anchors: str | None, alpn: list[str]) -> ssl.SSLContext:
    """Dialling a gate: its chain must reach ``anchors``, or, with None, is taken unverified because the
    caller checks the key's pinned ID right after the handshake, before any stream is opened."""
    ctx = _base(identity, False, alpn)
    ctx.check_hostname = False  # gates are named by key ID, not by the address we dial
    if anchors is None:
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx.load_verify_locations(cadata=anchors)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
