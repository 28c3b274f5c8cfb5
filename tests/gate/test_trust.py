"""The mesh peer rule: a certificate is the same configured peer whether that gate dials us or we dial it.

Certificates are real ones from gate.mesh.identity.keygen; the rule needs no handshake to be tested.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gate.config import MeshSpec, PeerSpec
from gate.errors import ConfigError
from gate.mesh.identity import Identity, keygen
from gate.mesh.trust import Trust


def der(identity: Identity) -> bytes:
    return ssl.PEM_cert_to_DER_cert(identity.cert_file.read_text())


@pytest.fixture
def gates(tmp_path: Path) -> dict[str, Identity]:
    keygen(tmp_path / "ca", is_ca=True)
    return {
        "me": keygen(tmp_path / "me", ca_dir=tmp_path / "ca"),
        "self_signed": keygen(tmp_path / "self_signed"),
        "member": keygen(tmp_path / "member", namespace="edge", ca_dir=tmp_path / "ca"),
        "pinned_member": keygen(tmp_path / "pinned_member", ca_dir=tmp_path / "ca"),
        "outsider": keygen(tmp_path / "outsider", trust_domain="other.test", ca_dir=tmp_path / "ca"),
        "stranger": keygen(tmp_path / "stranger", ca_dir=tmp_path / "ca"),
    }


def accepted_as(trust: Trust, gate: Identity) -> str | None:
    ident, peer = trust.inbound_peer(der(gate))
    assert ident == gate.id
    return None if peer is None else peer.name


def dialled_ok(trust: Trust, peer: PeerSpec, gate: Identity) -> bool:
    _, check = trust.client_context(peer)
    try:
        assert check.verify(der(gate)) == gate.id
    except ssl.SSLError:
        return False
    return True


def test_one_rule_for_both_directions(tmp_path: Path, gates: dict[str, Identity]) -> None:
    member, outsider = gates["member"], gates["outsider"]
    peers = (
        PeerSpec("ss", cert=gates["self_signed"].cert_file),  # pinned by its certificate
        PeerSpec("pm", id=gates["pinned_member"].id),  # pinned by ID, in the CA's mesh
        PeerSpec("po", id=outsider.id),  # pinned by ID, but its certificate is for another trust domain
        PeerSpec(f"{member.id}.edge.cluster.local"),  # trusted through the CA, named by its certificate
    )
    trust = Trust(MeshSpec(identity=tmp_path / "me", ca=tmp_path / "ca" / "cert.pem"), peers)
    expected = {"self_signed": "ss", "pinned_member": "pm", "outsider": None, "member": member.name,
                "stranger": None}
    assert {name: accepted_as(trust, gates[name]) for name in expected} == expected
    for peer in peers:
        for name in expected:
            assert dialled_ok(trust, peer, gates[name]) == (expected[name] == peer.name), (peer.name, name)


def test_a_ca_member_is_known_by_its_id_as_name(tmp_path: Path, gates: dict[str, Identity]) -> None:
    """Inbound, a gate trusted through the CA (no id:, no cert:) was never matched to its peer entry."""
    member = gates["member"]
    trust = Trust(MeshSpec(identity=tmp_path / "me", ca=tmp_path / "ca" / "cert.pem"), (PeerSpec(member.id),))
    assert accepted_as(trust, member) == member.id
    assert accepted_as(trust, gates["stranger"]) is None  # signed by the same CA, but another gate


def test_a_gate_pinned_by_id_must_be_in_the_trust_domain_when_it_dials_in(tmp_path: Path,
                                                                           gates: dict[str, Identity]) -> None:
    """Dialling it checked the trust domain; accepting it did not."""
    outsider = gates["outsider"]
    trust = Trust(MeshSpec(identity=tmp_path / "me", ca=tmp_path / "ca" / "cert.pem"), (PeerSpec("o", id=outsider.id),))
    assert accepted_as(trust, outsider) is None
    with pytest.raises(ssl.SSLError, match=r"is not in cluster\.local"):
        trust.client_context(trust.peers[0])[1].verify(der(outsider))


def test_without_a_ca_an_id_pin_is_the_whole_check(tmp_path: Path, gates: dict[str, Identity]) -> None:
    outsider, me = gates["outsider"], gates["me"]
    trust = Trust(MeshSpec(identity=tmp_path / "me"), (PeerSpec("o", address=None, id=outsider.id),))
    assert trust.client_context(trust.peers[0])[1].verify(der(outsider)) == outsider.id
    with pytest.raises(ssl.SSLError, match=f"has ID {me.id}, expected {outsider.id}"):
        trust.client_context(trust.peers[0])[1].verify(der(me))


def test_trust_material_problems_are_located(tmp_path: Path, gates: dict[str, Identity]) -> None:
    self_signed = gates["self_signed"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [
        (MeshSpec(identity=tmp_path / "me", ca=tmp_path / "ca"), (), "mesh.ca: ", "is a directory"),
        (MeshSpec(identity=tmp_path / "me", ca=tmp_path / "nope.pem"), (), "mesh.ca: ", "No such file"),
        (MeshSpec(identity=tmp_path / "me", ca=tmp_path / "junk.pem"), (), "mesh.ca: ", "holds no PEM certificate"),
        (MeshSpec(identity=tmp_path / "missing"), (), "mesh.identity: ", "is not a directory"),
        (MeshSpec(identity=tmp_path / "empty"), (), "mesh.identity: ", "No such file"),
        (MeshSpec(identity=tmp_path / "me"), (PeerSpec("a", cert=tmp_path / "junk.pem"),), "peers[0].cert: ",
         "holds no PEM certificate"),
        (MeshSpec(identity=tmp_path / "me"), (PeerSpec("a", cert=self_signed.cert_file, id=gates["me"].id),),
         "peers[0].cert: ", "not the configured id"),
        (MeshSpec(identity=tmp_path / "me"), (PeerSpec("a", cert=self_signed.cert_file),
                                              PeerSpec("b", id=self_signed.id)), "peers[1]: ", "configured twice"),
    ]
    for mesh, peers, where, what in cases:
        with pytest.raises(ConfigError) as e:
            Trust(mesh, peers)
        assert any(p.startswith(where) and what in p for p in e.value.problems), (where, e.value.problems)
