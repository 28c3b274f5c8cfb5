"""A gate's identity: its key pair, its certificate, and the ID derived from its public key.

The ID is base32 (lower case, no padding) of SHA-256 over the public key's SubjectPublicKeyInfo, as in
the seed project, so it can be pinned without any CA; the mesh name is ``ID.namespace.trust_domain``.
Certificates carry that name as DNS SAN and ``spiffe://TRUST_DOMAIN/ns/NAMESPACE/gate/ID`` as URI SAN,
the form a CA-based peer check reads. Keys are EC P-256 (fast handshakes) and written 0600.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from gate.errors import ConfigError

__all__ = ["Identity", "gate_id", "id_of_certificate", "keygen", "load_identity", "spiffe_uri_of"]

KEY_FILE, CERT_FILE = "key.pem", "cert.pem"
CERT_DAYS = 3650  # gates are pinned by ID or re-issued by their CA; expiry is not the control here


def gate_id(public_key: PublicKeyTypes) -> str:
    """base32(sha256(SubjectPublicKeyInfo DER)), lower case without padding (52 characters)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b32encode(hashlib.sha256(der).digest()).decode().rstrip("=").lower()


def id_of_certificate(der: bytes) -> str:
    """The ID of whoever holds the key of this (DER) certificate."""
    return gate_id(x509.load_der_x509_certificate(der).public_key())


def spiffe_uri_of(der: bytes) -> str | None:
    """The certificate's spiffe:// URI SAN, if it has one."""
    cert = x509.load_der_x509_certificate(der)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return next((u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")),
                None)


@dataclass(frozen=True)
class Identity:
    """Where a gate's key and certificate are, and who they say it is."""

    key_file: Path
    cert_file: Path
    id: str
    name: str  # ID.namespace.trust_domain
    uri: str | None  # spiffe://trust_domain/ns/namespace/gate/ID


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only (never world-readable, not even for an instant)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # also when the file existed with looser bits


def keygen(directory: Path, namespace: str = "default", trust_domain: str = "cluster.local",
           ca_dir: Path | None = None, is_ca: bool = False) -> Identity:
    """Write ``key.pem`` (0600) and ``cert.pem`` into ``directory``: self-signed, or signed by the CA
    whose key.pem/cert.pem are in ``ca_dir``. ``is_ca`` makes a mesh CA instead of a gate."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    ident = gate_id(key.public_key())
    name = "ca." + trust_domain if is_ca else f"{ident}.{namespace}.{trust_domain}"
    uri = None if is_ca else f"spiffe://{trust_domain}/ns/{namespace}/gate/{ident}"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    issuer_name, signing_key = subject, key
    if ca_dir is not None:
        ca_key = serialization.load_pem_private_key((ca_dir / KEY_FILE).read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CERT_FILE).read_bytes())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        issuer_name, signing_key = ca_cert.subject, ca_key
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        assert uri is not None
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(name), x509.UniformResourceIdentifier(uri)]), critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    _write_private(directory / KEY_FILE, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (directory / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(directory / KEY_FILE, directory / CERT_FILE, ident, name, uri)


def load_identity(directory: Path) -> Identity:
    """The identity in ``directory`` (written by ``keygen``); ConfigError saying what is wrong."""
    key_file, cert_file = directory / KEY_FILE, directory / CERT_FILE
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError([f"identity in {directory}: {e} (create one with: ugate keygen --dir {directory})"]) from e
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError([f"identity in {directory}: {CERT_FILE} is not the certificate of {KEY_FILE}"])
    if key_file.stat().st_mode & 0o077:
        raise ConfigError([f"identity in {directory}: {KEY_FILE} is readable by others (chmod 600 it)"])
    der = cert.public_bytes(serialization.Encoding.DER)
    ident = gate_id(cert.public_key())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return Identity(key_file, cert_file, ident, str(cn[0].value) if cn else ident, spiffe_uri_of(der))
