"""Drives a WireGuard interface with the ``wg`` tool: ``wg show IF dump`` to read it, ``wg set IF peer KEY
endpoint HOST:PORT allowed-ips ...`` to point a peer at the pair ICE selected.

Why the tool rather than a netlink library (pyroute2's WireGuard support): the tool speaks to both
WireGuard implementations the same way -- the kernel module over generic netlink, and a user-space
``wireguard-go`` over its UAPI socket (/var/run/wireguard/IF.sock), which is what runs here (no kernel
module) and which netlink cannot reach. ugate calls it a few times per ICE selection, never per packet.
``wg show all`` is avoided: user-space interfaces are found by socket file, not per network namespace.
The dump's parsing is pure (``parse_dump``), tested on the tool's real output.
"""

from __future__ import annotations

import base64
import binascii
import subprocess
from dataclasses import dataclass

from gate.validate import IPNetwork

__all__ = ["Dump", "WgPeer", "WgToolError", "parse_dump", "public_key_ok", "set_peer", "show"]

WG = "wg"
TIMEOUT = 5.0  # seconds for one ``wg`` call (it only talks to a local socket)


class WgToolError(OSError):
    """``wg`` failed or printed what we cannot read."""


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    endpoint: str | None  # "host:port" / "[v6]:port", None before it has one
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # seconds since the epoch, 0: none yet
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class Dump:
    public_key: str
    listen_port: int
    peers: tuple[WgPeer, ...]


def public_key_ok(text: str) -> bool:
    """A WireGuard public key as ``wg`` prints it: base64 of 32 bytes."""
    try:
        return len(text) == 44 and len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def parse_dump(text: str) -> Dump:
    """``wg show IF dump``: the interface line (private key, public key, listen port, fwmark), then one
    line per peer (key, preshared key, endpoint, allowed ips, handshake, rx, tx, keepalive), tab-separated."""
    lines = [line.split("\t") for line in text.splitlines() if line]
    if not lines or len(lines[0]) != 4:
        raise WgToolError(f"wg dump: no interface line in {text[:200]!r}")
    try:
        peers = tuple(WgPeer(public_key=f[0], endpoint=None if f[2] == "(none)" else f[2],
                             allowed_ips=() if f[3] == "(none)" else tuple(f[3].split(",")),
                             latest_handshake=int(f[4]), rx_bytes=int(f[5]), tx_bytes=int(f[6]))
                      for f in lines[1:] if len(f) == 8)
        if len(peers) != len(lines) - 1:
            raise ValueError("a peer line without 8 fields")
        return Dump(public_key=lines[0][1], listen_port=int(lines[0][2]), peers=peers)
    except ValueError as e:
        raise WgToolError(f"wg dump: {e}") from None


def _wg(*argv: str) -> str:
    try:
        done = subprocess.run([WG, *argv], capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WgToolError(f"wg {argv[0]}: {e}") from None
    if done.returncode != 0:
        raise WgToolError(f"wg {' '.join(argv[:2])}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def show(interface: str) -> Dump:
    """The interface's state (``wg show IF dump``); WgToolError if there is no such interface."""
    return parse_dump(_wg("show", interface, "dump"))


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def set_peer(interface: str, public_key: str, allowed_ips: tuple[IPNetwork, ...], host: str, port: int,
             keepalive: int) -> None:
    """``wg set IF peer KEY endpoint HOST:PORT allowed-ips A,B persistent-keepalive N``."""
    if not public_key_ok(public_key):
        raise WgToolError(f"not a WireGuard public key: {public_key[:60]!r}")
    _wg("set", interface, "peer", public_key, "endpoint", _endpoint(host, port),
        "allowed-ips", ",".join(map(str, allowed_ips)), "persistent-keepalive", str(keepalive) if keepalive else "off")
