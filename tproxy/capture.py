"""What capture rules are built from: a projection of gate.config.CaptureSpec, so tproxy/ needs no gate/.

Its own module so both rule backends (tproxy.rules for nftables and routing, tproxy.iptables) build on it
without importing each other.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tproxy.offload import Bypass

__all__ = ["Capture"]


@dataclass(frozen=True)
class Capture:
    """What the rules need to know (a projection of gate.config.CaptureSpec, so tproxy/ needs no gate/)."""

    mode: str  # "tproxy" | "redirect"
    role: str  # "router" | "egress" | "ingress"
    port4: int | None
    port6: int | None
    bypass_mark: int  # ugate's own sockets carry it: never captured
    route_mark: int = 0x1
    table: int = 100
    udp_port4: int | None = None
    udp_port6: int | None = None
    backend: str = "nftables"  # or "iptables" (python-iptables, legacy x_tables)
    interfaces: tuple[str, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    exclude: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # While no gate serves: "closed" drops (TPROXY) or refuses (REDIRECT) captured traffic; "open" lets it
    # bypass the gate (nftables only: the table dies with the process that holds it). See tproxy.rules.
    on_failure: str = "closed"
    # Router role, nftables: the kernel fast path sets, as (IP version, the UDP listener's session_timeout)
    # per family with one (see tproxy.offload); ``udp_owned``: the server's answers to a UDP upstream
    # socket bound to the client's address go to that socket (source-preserving UDP sessions).
    fastpath: tuple[tuple[int, float], ...] = ()
    udp_owned: bool = False
    bypass: tuple[Bypass, ...] = ()  # routes compiled to "do not capture" (tproxy mode, router/egress)
