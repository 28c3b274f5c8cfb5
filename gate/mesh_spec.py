"""The ``mesh:`` section (this gate's identity and trust settings) and ``peers:``, parsed and validated.

Files (keys, certificates) are read later, by gate.mesh.trust through gate.preflight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from gate.addr import Endpoint, parse_endpoint
from gate.route_spec import Match, parse_match
from gate.validate import Problems, boolean, gate_id, positive_int, string

__all__ = ["MeshSpec", "PeerSpec", "Transport", "parse_mesh", "parse_peers"]

Transport = Literal["h2", "webrtc"]


@dataclass(frozen=True)
class MeshSpec:
    """This gate's identity and how peers are trusted (see gate.mesh.peers for the rule)."""

    identity: Path  # directory with key.pem and cert.pem (ugate keygen --dir)
    ca: Path | None = None  # trust gates whose certificate this CA signed (URI SAN in trust_domain)
    trust_domain: str = "cluster.local"
    window: int = 16 << 20  # HTTP/2 flow-control window per stream and per connection, bytes
    max_frame: int = (1 << 24) - 1  # the largest DATA frame we accept (HTTP/2's maximum)
    # STUN servers for WebRTC's server-reflexive candidates (a public gate's ``stun`` listener): none by
    # default, and never a public one unasked
    stun: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class PeerSpec:
    """A gate we dial (``address``) and/or accept tunnels from, known by ID, certificate, or CA."""

    name: str
    address: Endpoint | None = None  # None: only accepted from, never dialled
    id: str | None = None  # pinned: base32(sha256(public key)) of its certificate
    cert: Path | None = None  # its (self-signed) certificate: trusted, and its ID pinned
    allow: tuple[Match, ...] = ()  # what it may reach through our h2 listeners; empty: nothing
    # We are behind NAT: keep a connection to this peer open and serve the flows it sends over it
    # (they arrive as listener ``name`` in routes and the access log).
    reverse: bool = False
    # Transports to this peer, tried in order: "webrtc" (gate.mesh.webrtc, signalled over h2) falls back
    # to "h2" when it cannot connect. Serving, "webrtc" listed means we answer this peer's offers.
    transports: tuple[Transport, ...] = ("h2",)
    # The peer is reached through this other peer (both behind NAT, both with tunnels to a public gate):
    # our WebRTC offers to it are relayed by that gate, HTTP/2 flows to it go to that gate (whose own
    # routes send them on), and its offers reach us only relayed by that gate (gate.mesh.h2_exchange).
    via_gate: str | None = None
    # Peers this one may have us relay its signaling to (we are the public gate): none by default.
    relay: tuple[str, ...] = ()


_MESH_KEYS = ("identity", "ca", "trust_domain", "window", "max_frame", "stun")
_PEER_KEYS = ("name", "address", "id", "cert", "allow", "reverse", "transports", "via_gate", "relay")
# What this part supports: HTTP/2 alone, WebRTC alone, or WebRTC falling back to HTTP/2
_TRANSPORT_ORDERS = (("h2",), ("webrtc",), ("webrtc", "h2"))


def _path(value: Any) -> Path:
    return Path(string(value))


def parse_mesh(raw: Any, p: Problems) -> MeshSpec | None:
    if raw is None:
        return None
    m = p.mapping(raw, "mesh", _MESH_KEYS)
    if "identity" not in m:
        p.add("mesh.identity", "missing (a directory with key.pem and cert.pem: ugate keygen --dir DIR)")
    window = p.get(m, "window", "mesh", positive_int, MeshSpec.window)
    if not 65535 <= window < 1 << 31:
        p.add("mesh.window", f"{window} is outside 65535 .. 2^31-1")
    max_frame = p.get(m, "max_frame", "mesh", positive_int, MeshSpec.max_frame)
    if not 1 << 14 <= max_frame < 1 << 24:
        p.add("mesh.max_frame", f"{max_frame} is outside 16384 .. 2^24-1")
    return MeshSpec(identity=p.get(m, "identity", "mesh", _path, Path(".")),
                    ca=p.get(m, "ca", "mesh", _path, None),
                    trust_domain=p.get(m, "trust_domain", "mesh", string, MeshSpec.trust_domain),
                    window=window, max_frame=max_frame, stun=p.get(m, "stun", "mesh", _endpoints, ()))


def _names(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(name, str) and name for name in raw):
        raise ValueError("a list of peer names")
    return tuple(raw)


def _endpoints(raw: Any) -> tuple[Endpoint, ...]:
    if not isinstance(raw, list):
        raise ValueError("a list of host:port")
    return tuple(parse_endpoint(item) for item in raw)


def _ca_name(name: str, trust_domain: str) -> bool:
    """Whether ``name`` can name a gate trusted through the CA alone: ID or ID.NAMESPACE.TRUST_DOMAIN."""
    ident, _, rest = name.partition(".")
    try:
        gate_id(ident)
    except ValueError:
        return False
    namespace, _, domain = rest.partition(".")
    return not rest or (bool(namespace) and domain == trust_domain)


def _transports(raw: Any, where: str, p: Problems) -> tuple[Transport, ...]:
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        p.add(where, "expected a list of transports: [webrtc, h2], [webrtc] or [h2]")
        return ("h2",)
    order = tuple(raw)
    if order not in _TRANSPORT_ORDERS:
        p.add(where, f"{list(order)} is not supported: [webrtc, h2] (WebRTC, falling back to HTTP/2), "
              "[webrtc] or [h2]")
        return ("h2",)
    return cast(tuple[Transport, ...], order)


def _peer(raw: Any, where: str, mesh: MeshSpec | None, listeners: set[str], p: Problems) -> PeerSpec:
    m = p.mapping(raw, where, _PEER_KEYS)
    if "name" not in m:
        p.add(f"{where}.name", "missing")
    allow_raw = m.get("allow", [])
    if not isinstance(allow_raw, list):
        p.add(f"{where}.allow", "expected a list of matches (as in routes: dst, port, host, ...)")
        allow_raw = []
    peer = PeerSpec(
        name=p.get(m, "name", where, string, where),
        address=p.get(m, "address", where, parse_endpoint, None),
        id=p.get(m, "id", where, gate_id, None),
        cert=p.get(m, "cert", where, _path, None),
        allow=tuple(parse_match(a, f"{where}.allow[{j}]", listeners, p) for j, a in enumerate(allow_raw)),
        reverse=p.get(m, "reverse", where, boolean, False),
        transports=_transports(m.get("transports", ["h2"]), f"{where}.transports", p),
        via_gate=p.get(m, "via_gate", where, string, None),
        relay=p.get(m, "relay", where, _names, ()),
    )
    if peer.via_gate is not None and (peer.address is not None or peer.reverse):
        p.add(f"{where}.via_gate", "a peer reached through another gate has no address: and no reverse: of its own")
    ca = mesh.ca if mesh is not None else None
    if peer.reverse and peer.address is None:
        p.add(f"{where}.reverse", "needs address: (the gate to keep a connection to)")
    if "id" in m or peer.cert is not None:
        if peer.address is None and peer.cert is None and ca is None and peer.via_gate is None:
            # (a gate reached through another is never connected to: its ID names it to the relay)
            p.add(where, "a gate pinned by id: alone can only be dialled (address:); to accept it, give its "
                  "cert: or a mesh.ca that signs its certificate")
    elif ca is None:
        p.add(where, "needs id: (pinned) or cert:, or a mesh.ca that signs its certificate")
    elif mesh is not None and not _ca_name(peer.name, mesh.trust_domain):
        p.add(f"{where}.name", f"{peer.name!r}: a peer trusted through mesh.ca alone is named by its certificate: "
              f"its gate ID or ID.NAMESPACE.{mesh.trust_domain} (or pin it with id: or cert:)")
    return peer


def parse_peers(raw: Any, mesh: MeshSpec | None, listeners: set[str], p: Problems) -> list[PeerSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        p.add("peers", "expected a list")
        return []
    if mesh is None:
        p.add("peers", "needs a mesh: section (this gate's identity)")
    peers: list[PeerSpec] = []
    for i, item in enumerate(raw):
        peer = _peer(item, f"peers[{i}]", mesh, listeners, p)
        if any(other.name == peer.name for other in peers):
            p.add(f"peers[{i}].name", f"{peer.name!r} is used twice")
        if peer.id is not None and any(other.id == peer.id for other in peers):
            p.add(f"peers[{i}].id", "is used twice (one gate, one peer entry)")
        peers.append(peer)
    _check_gates(peers, p)
    return peers


def _check_gates(peers: list[PeerSpec], p: Problems) -> None:
    """``via_gate`` and ``relay`` name other configured peers; a gate reached through another is one hop
    away (the gate in between is reached directly)."""
    by_name = {peer.name: peer for peer in peers}
    for i, peer in enumerate(peers):
        if peer.via_gate is not None:
            gate = by_name.get(peer.via_gate)
            if gate is None or gate is peer:
                p.add(f"peers[{i}].via_gate", f"{peer.via_gate!r} is not another configured peer")
            elif gate.via_gate is not None:
                p.add(f"peers[{i}].via_gate", f"{gate.name!r} is itself reached through {gate.via_gate!r} "
                      "(one gate in between at most)")
        for name in peer.relay:
            if name not in by_name or name == peer.name:
                p.add(f"peers[{i}].relay", f"{name!r} is not another configured peer")
