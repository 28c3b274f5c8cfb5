"""Network-namespace topologies for trying and testing capture (iproute2 commands, root only).

A test and scripts tool (scripts/netns, scripts/bench_router.py), not part of the installed gateway.

``router``: client -- gateway -- server, the gateway forwarding between a LAN and a WAN veth, IPv4 and
IPv6. ``sidecar``: an app namespace (where ugate runs beside the app) linked to a server namespace.
``two_nats``: two sites, each a host behind its own MASQUERADE NAT, and a public host, all joined by an
"internet" router (so traffic between the sites never crosses the public host).
Every namespace is named ``<prefix>-<role>``, so ``remove`` (also ``scripts/netns down``) can find what a
crashed run left, and nothing else (``ugx-other`` is not ``ug``'s).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

__all__ = ["Topology", "nic_like", "remove", "router", "sidecar", "two_nats", "two_sites"]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Topology:
    """Namespace names by role, and the addresses the roles have."""

    ns: dict[str, str]
    addr: dict[str, str] = field(default_factory=dict)  # e.g. "server4" -> "10.77.2.2"

    def cmd(self, role: str, *argv: str) -> list[str]:
        """``argv`` run inside the role's namespace."""
        return ["ip", "netns", "exec", self.ns[role], *argv]

    def run(self, role: str, *argv: str, input_text: str | None = None) -> str:
        return subprocess.run(self.cmd(role, *argv), check=True, capture_output=True, text=True,
                              input=input_text).stdout

    def remove(self) -> None:
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _namespace(name: str) -> None:
    _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")


def _link(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    _ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    _ip("-n", ns_a, "link", "set", if_a, "up")
    _ip("-n", ns_b, "link", "set", if_b, "up")


def _addr(ns: str, ifname: str, *cidrs: str) -> None:
    for cidr in cidrs:
        extra = ["nodad"] if ":" in cidr else []  # usable at once, not "tentative" for a second
        _ip("-n", ns, "addr", "add", cidr, "dev", ifname, *extra)


def _sysctl(ns: str, *settings: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", *settings], check=True, capture_output=True)


def router(prefix: str) -> Topology:
    """client (10.77.1.2, fd77:1::2) -> gateway (lan0 .1 / wan0 10.77.2.1) -> server (10.77.2.2, fd77:2::2)."""
    topo = Topology({"client": f"{prefix}-c", "gateway": f"{prefix}-g", "server": f"{prefix}-s"})
    try:
        for name in topo.ns.values():
            _namespace(name)
        c, g, s = topo.ns["client"], topo.ns["gateway"], topo.ns["server"]
        _link(c, "eth0", g, "lan0")
        _link(g, "wan0", s, "eth0")
        _addr(c, "eth0", "10.77.1.2/24", "fd77:1::2/64")
        _addr(g, "lan0", "10.77.1.1/24", "fd77:1::1/64")
        _addr(g, "wan0", "10.77.2.1/24", "fd77:2::1/64")
        _addr(s, "eth0", "10.77.2.2/24", "fd77:2::2/64")
        for ns, via4, via6 in ((c, "10.77.1.1", "fd77:1::1"), (s, "10.77.2.1", "fd77:2::1")):
            _ip("-n", ns, "route", "add", "default", "via", via4)
            _ip("-n", ns, "-6", "route", "add", "default", "via", via6)
        _sysctl(g, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0")
    except BaseException:
        topo.remove()
        raise
    topo.addr.update(client4="10.77.1.2", client6="fd77:1::2", gateway_lan4="10.77.1.1", gateway_wan4="10.77.2.1",
                     gateway_wan6="fd77:2::1", server4="10.77.2.2", server6="fd77:2::2")
    return topo


def nic_like(topo: Topology, role: str, ifname: str, on: bool = True) -> None:
    """Make a veth receive like a real NIC: GRO on, with NAPI in a thread of its own.

    A plain veth hands each packet to the receiver synchronously, one at a time, in the sender's syscall,
    so nothing is ever coalesced; a NIC raises an interrupt for a batch and its driver runs GRO over it.
    Threaded NAPI gives the veth such batches (the sender queues while the NAPI thread works), GRO merges
    them, and a socket with UDP_GRO (ugate's UDP relay) then gets several datagrams per read. UDP GRO on a
    veth only happens when the receiving side also has ``rx-udp-gro-forwarding`` (the sending veth does
    TSO). ``on=False`` turns it back into a plain veth. Needs ethtool."""
    ns, state = topo.ns[role], "on" if on else "off"
    gro = ["ip", "netns", "exec", ns, "ethtool", "-K", ifname, "gro", state, "rx-udp-gro-forwarding", state]
    threaded = ["ip", "netns", "exec", ns, "sh", "-c", f"echo {int(on)} > /sys/class/net/{ifname}/threaded"]
    for argv in (gro, threaded) if on else (threaded, gro):  # NAPI exists only while GRO is on
        subprocess.run(argv, check=True, capture_output=True)


def sidecar(prefix: str) -> Topology:
    """app (10.78.1.1, fd78:1::1; ugate runs here) -- server (10.78.1.2, fd78:1::2)."""
    topo = Topology({"app": f"{prefix}-a", "server": f"{prefix}-s"})
    try:
        for name in topo.ns.values():
            _namespace(name)
        a, s = topo.ns["app"], topo.ns["server"]
        _link(a, "eth0", s, "eth0")
        _addr(a, "eth0", "10.78.1.1/24", "fd78:1::1/64")
        _addr(s, "eth0", "10.78.1.2/24", "fd78:1::2/64")
    except BaseException:
        topo.remove()
        raise
    topo.addr.update(app4="10.78.1.1", app6="fd78:1::1", server4="10.78.1.2", server6="fd78:1::2")
    return topo


def two_sites(prefix: str) -> Topology:
    """Two sites, each a host behind its own NAT router, and a public namespace between the NATs:
    site_a (10.79.1.2) -- nat_a (lan0 .1 / wan0 10.79.0.2) -- public (10.79.0.1, 10.79.9.1)
    -- nat_b (wan0 10.79.9.2 / lan0 10.79.2.1) -- site_b (10.79.2.2). IPv4 only; the NATs forward but
    neither masquerades nor filters until the test loads its rules into them."""
    topo = Topology({"site_a": f"{prefix}-a", "nat_a": f"{prefix}-na", "public": f"{prefix}-p",
                     "nat_b": f"{prefix}-nb", "site_b": f"{prefix}-b"})
    try:
        for name in topo.ns.values():
            _namespace(name)
        a, na, p, nb, b = (topo.ns[r] for r in ("site_a", "nat_a", "public", "nat_b", "site_b"))
        _link(a, "eth0", na, "lan0")
        _link(na, "wan0", p, "to_a")
        _link(p, "to_b", nb, "wan0")
        _link(nb, "lan0", b, "eth0")
        for ns, ifname, cidr in ((a, "eth0", "10.79.1.2/24"), (na, "lan0", "10.79.1.1/24"),
                                 (na, "wan0", "10.79.0.2/24"), (p, "to_a", "10.79.0.1/24"),
                                 (p, "to_b", "10.79.9.1/24"), (nb, "wan0", "10.79.9.2/24"),
                                 (nb, "lan0", "10.79.2.1/24"), (b, "eth0", "10.79.2.2/24")):
            _addr(ns, ifname, cidr)
        for ns, via in ((a, "10.79.1.1"), (na, "10.79.0.1"), (nb, "10.79.9.1"), (b, "10.79.2.1")):
            _ip("-n", ns, "route", "add", "default", "via", via)
        for ns in (na, p, nb):
            _sysctl(ns, "net.ipv4.ip_forward=1")
    except BaseException:
        topo.remove()
        raise
    topo.addr.update(site_a="10.79.1.2", nat_a="10.79.0.2", public="10.79.0.1", public_b="10.79.9.1",
                     nat_b="10.79.9.2", site_b="10.79.2.2")
    return topo


# A home router: the LAN's connections leave as the WAN address, nothing unsolicited comes in. The input
# chain's drop matters for hole punching: a peer's check that arrives before our own first packet to it
# would otherwise be confirmed as a conntrack entry of the router's own, and our packet, clashing with it,
# would leave from another port than the one STUN reported (dropped before confirmation, it leaves none).
_MASQUERADE = """
table ip nat {
  chain post { type nat hook postrouting priority 100; oifname "wan0" masquerade; }
}
table inet fw {
  chain forward { type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan0" accept; }
  chain input { type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname != "wan0" accept; }
}
"""


def two_nats(prefix: str) -> Topology:
    """a (10.81.1.2) -- NAT na (198.18.1.2) --+
                                               inet (198.18.{1,2,3}.1) -- b (198.18.3.2, public)
       c (10.81.2.2) -- NAT nc (198.18.2.2) --+
    The NATs masquerade their LAN behind their WAN address and drop what nobody inside asked for (as
    home routers do: endpoint-independent mapping, address-and-port-dependent filtering). IPv4 only."""
    topo = Topology({role: f"{prefix}-{role}" for role in ("a", "na", "c", "nc", "b", "inet")})
    try:
        for name in topo.ns.values():
            _namespace(name)
        ns = topo.ns
        for site, net, wan in (("a", "10.81.1", "198.18.1"), ("c", "10.81.2", "198.18.2")):
            nat = ns[f"n{site}"]
            _link(ns[site], "eth0", nat, "lan0")
            _link(nat, "wan0", ns["inet"], f"in{site}")
            _addr(ns[site], "eth0", f"{net}.2/24")
            _addr(nat, "lan0", f"{net}.1/24")
            _addr(nat, "wan0", f"{wan}.2/24")
            _addr(ns["inet"], f"in{site}", f"{wan}.1/24")
            _ip("-n", ns[site], "route", "add", "default", "via", f"{net}.1")
            _ip("-n", nat, "route", "add", "default", "via", f"{wan}.1")
            _sysctl(nat, "net.ipv4.ip_forward=1")
            subprocess.run(topo.cmd(f"n{site}", "nft", "-f", "-"), input=_MASQUERADE, text=True, check=True,
                           capture_output=True)
        _link(ns["b"], "eth0", ns["inet"], "inb")
        _addr(ns["b"], "eth0", "198.18.3.2/24")
        _addr(ns["inet"], "inb", "198.18.3.1/24")
        _ip("-n", ns["b"], "route", "add", "default", "via", "198.18.3.1")
        _sysctl(ns["inet"], "net.ipv4.ip_forward=1")
    except BaseException:
        topo.remove()
        raise
    topo.addr.update(a4="10.81.1.2", c4="10.81.2.2", b4="198.18.3.2", na_wan4="198.18.1.2", nc_wan4="198.18.2.2")
    return topo


def remove(prefix: str) -> list[str]:
    """Delete every namespace named ``<prefix>-<role>`` (as ``router`` and ``sidecar`` name them); returns
    their names. Other tools' namespaces that merely start with ``prefix`` stay."""
    names = [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if line.strip()]
    gone = [n for n in names if n.startswith(f"{prefix}-") and "-" not in n[len(prefix) + 1:]]
    for name in gone:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return gone
