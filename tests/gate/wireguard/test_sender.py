"""Whom an offer is from: the gate the mesh authenticated, or the one a configured relay vouches for."""

from __future__ import annotations

import ipaddress

import pytest

from gate.errors import RejectedByRule
from gate.wg_spec import WgPeerSpec
from gate.wireguard.service import sender_of
from gate.wireguard.signal import Signal

US = "73tlqhtrwjbvyqqp55i7keo2tw4l7vjbq6o2dg5xdpkbcghostaq"
SITE_B = "pgbjsmjxg33wpowfhwyops6fsqm54xfbxn7emmb57a7orcq4t5oq"
HUB = "ttyqk6wrngzoxt4jj53e25mx537yiadv34qdauu5kznhapvksc3q"
STRANGER = "eqgvce5b4ook6u7c5howmrlw6x7t64f4yoexlqfz7rwbmjqkqnza"
PEERS = (WgPeerSpec(gate=SITE_B, via="hub", allowed_ips=(ipaddress.ip_network("10.99.0.2/32"),), ice_port=51900),)
OFFER = Signal(to=US, key="CMK+72kAW4ECY6mUX7gZfBq3/a//nBraEGnqyP09DlY=", ufrag="abcd", pwd="p" * 22, candidates=())


def test_relayed_by_the_peers_via() -> None:
    assert sender_of(OFFER.via_relay(SITE_B), HUB, "hub", PEERS) is PEERS[0]


def test_sent_directly_by_the_peer() -> None:
    assert sender_of(OFFER, SITE_B, "site_b", PEERS) is PEERS[0]
    assert sender_of(OFFER.via_relay(SITE_B), SITE_B, "site_b", PEERS) is PEERS[0]  # its own name in from


@pytest.mark.parametrize(("offer", "ident", "sent_by"), [
    (OFFER.via_relay(SITE_B), STRANGER, "stranger"),  # only the peer's via may speak for it
    (OFFER.via_relay(SITE_B), HUB, None),  # a gate with no peers: entry vouches for nobody
    (OFFER.via_relay(STRANGER), HUB, "hub"),  # the hub forwards someone who is not our WireGuard peer
    (OFFER, HUB, "hub"),  # the hub itself is not a WireGuard peer
    (OFFER, STRANGER, None),
])
def test_refused(offer: Signal, ident: str, sent_by: str | None) -> None:
    with pytest.raises(RejectedByRule):
        sender_of(offer, ident, sent_by, PEERS)
