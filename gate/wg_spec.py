"""The ``wireguard:`` section: which WireGuard interface ugate finds endpoints for, how its traffic shares
the ICE port (``mode``), and which mesh gates are its WireGuard peers.

A WireGuard peer is named by its gate ID only: its public key is not configured but learned from the
signalling that gate sends over the authenticated mesh (gate.wireguard.signal), so a key is never taken
from an unauthenticated channel. What a peer may send through the tunnel (``allowed_ips``) is ours to
decide, so it is configured here and never taken from the peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gate.addr import Endpoint, parse_endpoint
from gate.mesh_spec import MeshSpec, PeerSpec
from gate.validate import IPNetwork, Problems, boolean, gate_id, networks, one_of, port_number, positive_int, string

__all__ = ["WgMode", "WgPeerSpec", "WireguardSpec", "parse_wireguard"]

IFNAME_MAX = 15  # IFNAMSIZ - 1: the kernel refuses longer interface names
MAX_WG_PEERS = 64  # one ICE agent (and one bound port) per peer: a bound on sockets and signalling


class WgMode(StrEnum):
    """How WireGuard and ICE share the outer UDP port (the seed's proxying modes)."""

    NFTABLES = "nftables"  # mode 3: kernel port rewrite keyed on the STUN magic cookie (tproxy.wg_redirect)
    # Modes not built yet, named so a config asking for them gets a clear answer
    PROXY = "proxy"  # mode 1: user-space relay, a local socket per peer
    RAW = "raw"  # mode 2: raw socket + BPF filter
    IPTABLES = "iptables"  # mode 4: mode 3 through python-iptables


BUILT_MODES = (WgMode.NFTABLES, WgMode.PROXY)


@dataclass(frozen=True)
class WgPeerSpec:
    """A mesh gate that is also a WireGuard peer of ours."""

    gate: str  # its gate ID (the key ID of its mesh certificate)
    via: str  # the ``peers:`` entry whose tunnel carries the signalling (the gate itself, or a relay)
    allowed_ips: tuple[IPNetwork, ...]
    ice_port: int  # the outer UDP port shared by ICE and WireGuard for this peer
    keepalive: int = 25  # WireGuard persistent-keepalive, seconds (keeps the NAT mapping; 0: off)


@dataclass(frozen=True)
class WireguardSpec:
    interface: str | None  # None: this gate only relays other gates' signalling
    mode: WgMode = WgMode.NFTABLES
    listen_port: int | None = None  # None: read from ``wg show IF listen-port`` (and watched)
    stun: tuple[Endpoint, ...] = ()  # STUN servers for server-reflexive candidates (default: mesh.stun)
    relay: bool = False  # forward WireGuard signalling between two of our peers (a public gate)
    peers: tuple[WgPeerSpec, ...] = ()


_KEYS = ("interface", "mode", "listen_port", "stun", "relay", "peers")
_PEER_KEYS = ("gate", "via", "allowed_ips", "ice_port", "keepalive")


def _ifname(value: Any) -> str:
    name = string(value)
    if not 0 < len(name) <= IFNAME_MAX or "/" in name or name.strip() != name or name in (".", ".."):
        raise ValueError(f"{name!r} is not an interface name (1-{IFNAME_MAX} characters, no '/' or spaces)")
    return name


def _endpoints(raw: Any) -> tuple[Endpoint, ...]:
    if not isinstance(raw, list):
        raise ValueError("a list of host:port")
    return tuple(parse_endpoint(item) for item in raw)


def _peer(raw: Any, where: str, mesh_peers: Sequence[PeerSpec], p: Problems) -> WgPeerSpec | None:
    m = p.mapping(raw, where, _PEER_KEYS)
    for key in ("gate", "via", "allowed_ips", "ice_port"):
        if key not in m:
            p.add(f"{where}.{key}", "missing")
    via = p.get(m, "via", where, string, "")
    if via and not any(peer.name == via for peer in mesh_peers):
        p.add(f"{where}.via", f"{via!r} is not a peers: entry (the gate whose mesh tunnel carries the signalling)")
    none: tuple[IPNetwork, ...] = ()
    before = len(p.items)
    allowed = p.get(m, "allowed_ips", where, networks, none)
    if "allowed_ips" in m and not allowed and len(p.items) == before:
        p.add(f"{where}.allowed_ips", "empty: the peer could send nothing through the tunnel")
    keepalive = p.get(m, "keepalive", where, positive_int, 25) if m.get("keepalive") != 0 else 0
    if keepalive > 65535:
        p.add(f"{where}.keepalive", f"{keepalive} is over 65535 seconds")
    if "gate" not in m or "via" not in m or "ice_port" not in m:
        return None
    return WgPeerSpec(gate=p.get(m, "gate", where, gate_id, ""), via=via, allowed_ips=allowed,
                      ice_port=p.get(m, "ice_port", where, port_number, 0), keepalive=keepalive)


def parse_wireguard(raw: Any, mesh: MeshSpec | None, mesh_peers: Sequence[PeerSpec], workers: int,
                    p: Problems) -> WireguardSpec | None:
    if raw is None:
        return None
    w = "wireguard"
    m = p.mapping(raw, w, _KEYS)
    if mesh is None:
        p.add(w, "needs a mesh: section (peers are gates, and the signalling travels over the mesh)")
    if workers != 1:
        p.add(w, f"needs workers: 1 (one ICE agent per peer and port; {workers} workers would each run one)")
    interface = p.get(m, "interface", w, _ifname, None)
    relay = p.get(m, "relay", w, boolean, False)
    mode = p.get(m, "mode", w, one_of(WgMode), WgMode.NFTABLES)
    if mode not in BUILT_MODES:
        p.add(f"{w}.mode", f"{mode} is not built yet (built: {', '.join(BUILT_MODES)})")
    raw_peers = m.get("peers", [])
    if not isinstance(raw_peers, list):
        p.add(f"{w}.peers", "expected a list")
        raw_peers = []
    if len(raw_peers) > MAX_WG_PEERS:
        p.add(f"{w}.peers", f"{len(raw_peers)} peers: at most {MAX_WG_PEERS}")
    if interface is None and raw_peers and "interface" not in m:
        p.add(f"{w}.interface", "missing (the WireGuard interface whose peers' endpoints ugate sets)")
    if interface is None and not relay and "interface" not in m:
        p.add(f"{w}.interface", "missing (or relay: true for a gate that only forwards signalling)")
    listen_port = p.get(m, "listen_port", w, port_number, None)
    peers: list[WgPeerSpec] = []
    for i, item in enumerate(raw_peers):
        where = f"{w}.peers[{i}]"
        peer = _peer(item, where, mesh_peers, p)
        if peer is None:
            continue
        if any(other.gate == peer.gate for other in peers):
            p.add(f"{where}.gate", "is listed twice")
        if any(other.ice_port == peer.ice_port for other in peers):
            p.add(f"{where}.ice_port", f"{peer.ice_port} is used by another peer (one ICE agent per port)")
        if listen_port is not None and peer.ice_port == listen_port:
            p.add(f"{where}.ice_port", f"{peer.ice_port} is the interface's listen_port (ICE needs its own)")
        peers.append(peer)
    stun = p.get(m, "stun", w, _endpoints, mesh.stun if mesh is not None else ())
    return WireguardSpec(interface=interface, mode=mode, listen_port=listen_port, stun=stun, relay=relay,
                         peers=tuple(peers))
