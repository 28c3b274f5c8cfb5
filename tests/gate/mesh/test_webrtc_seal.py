"""Seals on relayed signaling: an offer or answer signed by the gate whose ID the receiver expects verifies;
anything the relay could do to it (swap the description's fingerprint, pass it to another gate, turn an
offer into an answer, replay an answer for another offer, sign with its own key) does not."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from gate.config import PeerSpec
from gate.mesh.identity import gate_id, keygen
from gate.mesh.transport import Exchanged
from gate.mesh.webrtc.answerer import Answerer
from gate.mesh.webrtc.link import closed_all
from gate.mesh.webrtc.seal import MAX_SEAL_FIELD, Seal, Sealer, check_seal
from gate.mesh.webrtc.wire import SignalError, SignalMessage, check_sdp, decode_signal, encode_signal
from tests.fuzzing import budget
from tests.gate.mesh.test_webrtc_wire import ANSWER, OFFER


@pytest.fixture
def gates(tmp_path: Path) -> dict[str, tuple[str, Sealer]]:
    out = {}
    for name in ("a", "b", "c"):
        identity = keygen(tmp_path / name)
        out[name] = (identity.id, Sealer.load(identity.key_file))
    return out


def test_a_seal_verifies_for_its_role_sender_receiver_and_description(gates: dict[str, tuple[str, Sealer]]) -> None:
    (id_a, a), (id_c, c) = gates["a"], gates["c"]
    offer_seal = a.seal("offer", id_a, id_c, OFFER)
    check_seal(offer_seal, "offer", id_a, id_c, OFFER)
    answer_seal = c.seal("answer", id_c, id_a, ANSWER, OFFER)
    check_seal(answer_seal, "answer", id_c, id_a, ANSWER, OFFER)


def test_what_a_relay_could_do_does_not_verify(gates: dict[str, tuple[str, Sealer]]) -> None:
    (id_a, a), (id_b, b), (id_c, c) = gates["a"], gates["b"], gates["c"]
    seal = a.seal("offer", id_a, id_c, OFFER)
    fingerprint = check_sdp(OFFER).fingerprint
    swapped = OFFER.replace(fingerprint, fingerprint[:-2] + ("00" if fingerprint[-2:] != "00" else "11"))
    answer = c.seal("answer", id_c, id_a, ANSWER, OFFER)
    cases = {
        "its own fingerprint": (seal, "offer", id_a, id_c, swapped, ""),
        "to another gate": (seal, "offer", id_a, id_b, OFFER, ""),
        "an offer as an answer": (seal, "answer", id_a, id_c, OFFER, ""),
        "replayed for another offer": (answer, "answer", id_c, id_a, ANSWER, swapped),
        "its own key": (b.seal("offer", id_a, id_c, OFFER), "offer", id_a, id_c, OFFER, ""),
        "no seal": (Seal("", ""), "offer", id_a, id_c, OFFER, ""),
        "not base64": (Seal("%%%", seal.sig), "offer", id_a, id_c, OFFER, ""),
        "not a key": (Seal(base64.b64encode(b"junk").decode(), seal.sig), "offer", id_a, id_c, OFFER, ""),
        "too long": (Seal("A" * (MAX_SEAL_FIELD + 4), seal.sig), "offer", id_a, id_c, OFFER, ""),
    }
    for why, (tried, role, sender, receiver, sdp, offer_sdp) in cases.items():
        with pytest.raises(SignalError):
            check_seal(tried, role, sender, receiver, sdp, offer_sdp)  # type: ignore[arg-type]
            pytest.fail(why)


def test_other_key_types_seal_too() -> None:
    for key in (ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(65537, 2048),
                ec.generate_private_key(ec.SECP384R1())):
        sealer = Sealer(key)
        ident = gate_id(key.public_key())
        check_seal(sealer.seal("offer", ident, "x", OFFER), "offer", ident, "x", OFFER)


def test_signal_messages_carry_the_seal() -> None:
    message = SignalMessage(gate="a", sdp=OFFER, key="k", sig="s")
    assert decode_signal(encode_signal(message)) == message
    assert b'"key"' not in encode_signal(SignalMessage(gate="a", sdp=OFFER))  # unsealed: as before
    with pytest.raises(SignalError):
        decode_signal(b'{"v": 1, "gate": "a", "sdp": "x", "key": 5}')


@budget(200)
@given(st.text(max_size=200), st.text(max_size=200), st.sampled_from(["offer", "answer"]))
def test_fuzz_seals_verify_or_are_a_signal_error(key: str, sig: str, role: str) -> None:
    try:
        check_seal(Seal(key, sig), role, "a" * 52, "c" * 52, OFFER)  # type: ignore[arg-type]
    except SignalError:
        return
    raise AssertionError("a random seal verified")


def test_the_answerer_takes_a_sealed_relayed_offer_and_seals_its_answer(gates: dict[str, tuple[str, Sealer]]) -> None:
    (id_a, a), (id_b, _b), (id_c, c) = gates["a"], gates["b"], gates["c"]
    relay = PeerSpec(name="b", id=id_b)
    origin = PeerSpec(name="a", id=id_a, via_gate="b", transports=("webrtc", "h2"))
    sender = Exchanged("webrtc", id_b, relay, origin=id_a, origin_peer=origin)
    seal = a.seal("offer", id_a, id_c, OFFER)

    def serve(*_args: object) -> object:
        raise AssertionError("no flow may be served")

    async def scenario() -> tuple[str, SignalMessage]:
        answerer = Answerer(id_c, 5.0, sealer=c)
        unsealed = encode_signal(SignalMessage(gate=id_a, sdp=OFFER))
        refused = decode_signal(await answerer.answer(serve, sender, unsealed)).error  # type: ignore[arg-type]
        sealed = encode_signal(SignalMessage(gate=id_a, sdp=OFFER, key=seal.key, sig=seal.sig))
        answer = decode_signal(await answerer.answer(serve, sender, sealed))  # type: ignore[arg-type]
        answerer.close()
        await closed_all()
        return refused, answer

    refused, answer = asyncio.run(scenario())
    assert refused == "relayed offer: the offer is not sealed"
    assert not answer.error and answer.gate == id_c
    check_seal(Seal(answer.key, answer.sig), "answer", id_c, id_a, answer.sdp, OFFER)
