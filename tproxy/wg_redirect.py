"""Mode 3 of sharing one UDP port between ICE and WireGuard: the kernel rewrites ports, keyed on STUN's
magic cookie, so WireGuard's packets never leave the kernel and ugate's ICE socket sees only STUN.

The seed's (cunicu's) two rules, in a table of ugate's own (``inet ugate_wg``, created and deleted whole,
apart from the capture table ``inet ugate`` so applying one never clears the other):
- input (priority raw): a datagram to an ICE port whose payload bytes 4..8 (``@th,96,32``: the transport
  header's bits 96..128) are not 0x2112A442 is WireGuard: ``notrack``, destination port set to the
  interface's listen port. STUN (cookie present) goes on to the ICE socket; a counter shows each.
- output (priority raw): WireGuard's datagrams (source port = listen port) to a remote ICE candidate leave
  from the ICE port that candidate was paired with, so the NAT maps them exactly as the ICE checks that
  opened it. The remote -> ICE port pairs live in a map (``out4``/``out6``) that the gate fills as ICE
  selects pairs: the rules are fixed, ``ugate rules show`` prints them before any pair exists, and a
  datagram to a remote not in the map is left alone (the map lookup fails before ``notrack``).
Built as text first (``build``, compared without root), applied and cleared exactly (``apply``/``clear``);
``apply`` clears first, so rules a killed gate left behind are replaced at the next start.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass

__all__ = ["WG_TABLE", "WgRedirect", "apply", "build", "clear", "map_element", "set_endpoint"]

WG_TABLE = "ugate_wg"
STUN_COOKIE = 0x2112A442  # RFC 5389: bytes 4..8 of every STUN message


@dataclass(frozen=True)
class WgRedirect:
    """What the rules need: the WireGuard interface's listen port and the ICE ports sharing it."""

    listen_port: int
    ice_ports: tuple[int, ...]


def _ports(ports: tuple[int, ...]) -> str:
    return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, sorted(ports))) + " }"


def build(spec: WgRedirect) -> str:
    """The nft script for ``spec``; pure."""
    ice = _ports(spec.ice_ports)
    cookie = f"@th,96,32 {STUN_COOKIE:#x}"
    return "\n".join([
        f"table inet {WG_TABLE} {{",
        "  map out4 { type ipv4_addr . inet_service : inet_service; }",
        "  map out6 { type ipv6_addr . inet_service : inet_service; }",
        "  chain input {",
        "    type filter hook input priority raw; policy accept;",
        f'    udp dport {ice} {cookie} counter comment "stun: to the ICE socket"',
        f"    udp dport {ice} @th,96,32 != {STUN_COOKIE:#x} counter notrack udp dport set {spec.listen_port} "
        'comment "wireguard: to the interface"',
        "  }",
        "  chain output {",
        "    type filter hook output priority raw; policy accept;",
        f"    meta nfproto ipv4 udp sport {spec.listen_port} udp sport set ip daddr . udp dport map @out4 "
        'counter notrack comment "wireguard: from the ICE port"',
        f"    meta nfproto ipv6 udp sport {spec.listen_port} udp sport set ip6 daddr . udp dport map @out6 "
        'counter notrack comment "wireguard: from the ICE port"',
        "  }",
        "}",
        "",
    ])


def map_element(host: str, port: int, ice_port: int) -> tuple[str, str]:
    """(map name, element) sending WireGuard's datagrams to ``host``:``port`` from ``ice_port``."""
    ip = ipaddress.ip_address(host)
    return ("out4" if ip.version == 4 else "out6"), f"{ip} . {port} : {ice_port}"


def _nft(script: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True)
    if done.returncode != 0:
        raise OSError(f"nft failed: {done.stderr.strip()}")


def clear() -> None:
    """Delete ugate's WireGuard table, if any (idempotent: nft's add-then-delete idiom)."""
    _nft(f"add table inet {WG_TABLE}\ndelete table inet {WG_TABLE}\n")


def apply(spec: WgRedirect) -> None:
    """Replace whatever table an earlier run left with the rules for ``spec`` (one nft transaction)."""
    _nft(f"add table inet {WG_TABLE}\ndelete table inet {WG_TABLE}\n" + build(spec))


def set_endpoint(host: str, port: int, ice_port: int, old: tuple[str, int] | None = None) -> None:
    """Point the output rewrite for ``host``:``port`` at ``ice_port`` (dropping ``old``'s element)."""
    lines = []
    if old is not None:
        name, element = map_element(old[0], old[1], ice_port)
        lines.append(f"delete element inet {WG_TABLE} {name} {{ {element.split(' : ')[0]} }}")
    name, element = map_element(host, port, ice_port)
    lines.append(f"add element inet {WG_TABLE} {name} {{ {element} }}")
    script = "\n".join(lines) + "\n"
    try:
        _nft(script)
    except OSError:
        if old is None:
            raise
        _nft("\n".join(lines[1:]) + "\n")  # the old element was already gone
