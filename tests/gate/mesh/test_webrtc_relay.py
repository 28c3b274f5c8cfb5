"""Relayed signaling's rules without a network: the peer fields (``via_gate``, ``relay``) and ugate check,
gate IDs of configured peers, what a relay passes on (``relay_target``, ``Relay``'s bounds), and what the
answering gate takes from a relay (only for the gate whose ``via_gate`` it is)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gate.config import PeerSpec, parse_config
from gate.errors import ClientProtocolError, RejectedByRule
from gate.mesh.h2_exchange import MAX_RELAYED_BODY, MAX_RELAYS, Relay, relay_target
from gate.mesh.identity import keygen
from gate.mesh.peers import Peers
from gate.mesh.transport import Exchanged
from gate.mesh.webrtc.answerer import Answerer
from gate.mesh.webrtc.wire import SignalMessage, decode_signal, encode_signal
from tests.gate.mesh.test_webrtc_wire import ID_A, OFFER
from tests.gate.test_cli import ugate
from tests.gate.test_config import GATE_ID, problems


def _id(seed: str) -> str:
    return base64.b32encode(hashlib.sha256(seed.encode()).digest()).decode().rstrip("=").lower()


ID_B, ID_C = _id("b"), _id("c")


def _config(*peers: dict[str, Any]) -> dict[str, Any]:
    return {"mesh": {"identity": "/etc/ugate/id"}, "peers": list(peers),
            "listeners": [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1080"}], "routes": [{"via": "c"}]}


def _b(**extra: Any) -> dict[str, Any]:
    return {"name": "b", "address": "198.18.3.2:15008", "id": GATE_ID, "reverse": True, **extra}


def _c(**extra: Any) -> dict[str, Any]:
    return {"name": "c", "id": ID_C, "via_gate": "b", "transports": ["webrtc", "h2"], **extra}


def test_via_gate_and_relay_are_parsed() -> None:
    peers = parse_config(_config(_b(relay=["c"]), _c())).peers
    assert (peers[0].via_gate, peers[0].relay) == (None, ("c",))
    assert (peers[1].via_gate, peers[1].relay, peers[1].transports) == ("b", (), ("webrtc", "h2"))
    assert parse_config(_config(_b(), _c(via_gate=None, address="10.0.0.3:1"))).peers[0].relay == ()  # nobody
    # relayed by default


@pytest.mark.parametrize(("peers", "expected"), [
    ((_b(), _c(via_gate="x")), "peers[1].via_gate: 'x' is not another configured peer"),
    ((_b(), _c(via_gate="c")), "peers[1].via_gate: 'c' is not another configured peer"),
    ((_b(via_gate="c", reverse=False, address=None, id=GATE_ID), _c()),
     "peers[1].via_gate: 'b' is itself reached through 'c' (one gate in between at most)"),
    ((_b(), _c(address="10.0.0.3:15008")),
     "peers[1].via_gate: a peer reached through another gate has no address: and no reverse: of its own"),
    ((_b(relay=["x"]), _c()), "peers[0].relay: 'x' is not another configured peer"),
    ((_b(relay=["b"]), _c()), "peers[0].relay: 'b' is not another configured peer"),
    ((_b(relay="c"), _c()), "peers[0].relay: a list of peer names"),
])
def test_bad_gate_fields_are_located_problems(peers: tuple[dict[str, Any], ...], expected: str) -> None:
    assert expected in problems(_config(*peers)), problems(_config(*peers))


def test_ugate_check_validates_via_gate(tmp_path: Path) -> None:
    keygen(tmp_path / "id")
    config = _config(_b(), _c())
    config["mesh"]["identity"] = str(tmp_path / "id")
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump(config))
    assert ugate("check", "--config", str(path)).returncode == 0
    config["peers"][1]["via_gate"] = "nobody"
    path.write_text(yaml.safe_dump(config))
    done = ugate("check", "--config", str(path))
    assert done.returncode == 2 and "peers[1].via_gate: 'nobody' is not another configured peer" in done.stderr


def test_gate_ids_of_peers_known_by_cert_id_or_ca_name() -> None:
    by_cert = PeerSpec(name="a", cert=Path("a.pem"))
    by_id = PeerSpec(name="c", id=ID_C)
    by_ca = PeerSpec(name=f"{ID_B}.edge.cluster.local")
    with_ca = Peers((by_cert, by_id, by_ca), {"a": ID_A}, "cluster.local", has_ca=True)
    assert [with_ca.id_of(p) for p in (by_cert, by_id, by_ca)] == [ID_A, ID_C, ID_B]
    assert [with_ca.by_id(i) for i in (ID_A, ID_C, ID_B, "d" * 52, "")] == [by_cert, by_id, by_ca, None, None]
    assert Peers((by_ca,), {}, "cluster.local", has_ca=False).by_id(ID_B) is None  # no CA: no name-trusted peer


def test_what_a_relay_passes_on() -> None:
    target = PeerSpec(name="c", id=ID_C)
    other = PeerSpec(name="d", id="d" * 52)
    sender = PeerSpec(name="a", id=ID_A, relay=("c",))
    policy = Peers((sender, target, other), {}, "cluster.local", has_ca=False)
    assert relay_target(policy, Exchanged("webrtc", ID_A, sender), ID_C) is target
    refusals = {
        "stranger": relay_target(policy, Exchanged("webrtc", ID_A, None), ID_C),
        "kind": relay_target(policy, Exchanged("flows", ID_A, sender), ID_C),
        "again": relay_target(policy, Exchanged("webrtc", ID_A, sender, origin="e" * 52), ID_C),
        "unknown": relay_target(policy, Exchanged("webrtc", ID_A, sender), "f" * 52),
        "not allowed": relay_target(policy, Exchanged("webrtc", ID_A, sender), "d" * 52),
        "no relay list": relay_target(policy, Exchanged("webrtc", ID_C, target), ID_A),
    }
    assert refusals == {
        "stranger": f"gate {ID_A} is not a configured peer",
        "kind": "'flows' exchanges are not relayed",
        "again": "a relayed exchange is not relayed again",
        "unknown": f"no peer here has gate ID {'f' * 52}",
        "not allowed": "peer a may not signal to d through us (its relay: list)",
        "no relay list": "peer c may not signal to a through us (its relay: list)",
    }


def test_the_relay_vouches_for_the_sender_and_bounds_size_and_concurrency() -> None:
    sender, target = PeerSpec(name="a", relay=("c",)), PeerSpec(name="c")
    sent: list[tuple[str, str, bytes, str]] = []
    release = asyncio.Event()

    async def send(name: str, kind: str, body: bytes, _deadline: float, vouch: str) -> bytes:
        sent.append((name, kind, body, vouch))
        await release.wait()
        return b"answer:" + body

    async def scenario() -> None:
        relay = Relay(send)
        exchanged = Exchanged("webrtc", ID_A, sender, to=target)
        with pytest.raises(ClientProtocolError):
            await relay(exchanged, b"x" * (MAX_RELAYED_BODY + 1))
        under_way = [asyncio.create_task(relay(exchanged, b"offer%d" % i)) for i in range(MAX_RELAYS)]
        await asyncio.sleep(0)
        assert relay.active == {"a": MAX_RELAYS}
        with pytest.raises(RejectedByRule, match="relayed exchanges under way"):
            await relay(exchanged, b"one too many")
        release.set()
        assert await asyncio.gather(*under_way) == [b"answer:offer%d" % i for i in range(MAX_RELAYS)]
        assert relay.active == {}  # the table empties as the exchanges end
        assert await relay(exchanged, b"x" * MAX_RELAYED_BODY) == b"answer:" + b"x" * MAX_RELAYED_BODY

    asyncio.run(scenario())
    assert {(name, kind, vouch) for name, kind, _body, vouch in sent} == {("c", "webrtc", ID_A)}
    assert len(sent) == MAX_RELAYS + 1


def test_the_answerer_takes_a_relayed_offer_only_from_the_origins_via_gate() -> None:
    relay = PeerSpec(name="b", id=ID_B)
    origin = PeerSpec(name="a", id=ID_A, via_gate="b", transports=("webrtc", "h2"))
    elsewhere = PeerSpec(name="a", id=ID_A, transports=("webrtc", "h2"))  # no via_gate: only direct offers
    offer = encode_signal(SignalMessage(gate=ID_A, sdp=OFFER))

    def serve(*_args: object) -> object:
        raise AssertionError("no flow may be served")

    async def scenario() -> list[str]:
        answerer = Answerer("c" * 52, 5.0)
        cases = [
            Exchanged("webrtc", ID_B, relay, origin=ID_A, origin_peer=elsewhere),
            Exchanged("webrtc", ID_B, relay, origin=ID_A, origin_peer=None),  # vouched for a stranger
            Exchanged("webrtc", ID_B, None, origin=ID_A, origin_peer=origin),  # relayed by a stranger
            Exchanged("webrtc", ID_B, PeerSpec(name="d", id="d" * 52), origin=ID_A, origin_peer=origin),
            Exchanged("webrtc", ID_B, relay, origin="e" * 52, origin_peer=origin),  # the offer names ID_A
        ]
        errors = [decode_signal(await answerer.answer(serve, case, offer)).error  # type: ignore[arg-type]
                  for case in cases]
        assert not answerer.links
        return errors

    errors = asyncio.run(scenario())
    assert errors[:4] == [f"gate {ID_B} may not relay offers from gate {ID_A}"] * 4, errors
    assert errors[4] == f"offer names gate {ID_A}, the tunnel is gate {'e' * 52}"
