"""Return routing of an ingress sidecar that preserves the client's address (Istio's TPROXY inbound mode).

The gate dials the app beside it from the client's own address (IP_TRANSPARENT), so the app answers to
the client's address, which is not ours: left alone, those replies would leave by the default route and
the client would reset them. The gate's upstream sockets carry ugate's bypass mark; the first packet of
such a connection (source not ours, destination ours) saves ``route_mark`` as the connection's mark, and
the app's replies (reply direction, unmarked) get it back as their packet mark in OUTPUT. A route-type
chain (iptables: mangle OUTPUT) re-routes a packet whose mark changed, so they follow the policy route
that TPROXY uses already (``fwmark route_mark lookup table`` -> ``local default dev lo``): over lo into
PREROUTING, where the ``socket transparent`` rule delivers them to the gate's upstream socket.

Only connections the gate itself opened get a connection mark, so the app's own traffic to anywhere else
is untouched, and the gate's traffic keeps its bypass mark (never captured, never looped). The connection
mark is set whole (not masked): other users of ct mark in an ingress sidecar's namespace would clash.
Both rule sets live in ugate's table / UGATE_OUT chain, so ``clear`` (and, with ``on_failure: open``,
the gate's death) removes them with the rest; the policy routing is the TPROXY one, nothing new.
"""

from __future__ import annotations

from tproxy.capture import Capture
from tproxy.iptables import IptRule

__all__ = ["CHAIN", "needs_return_routing", "owned_rule", "return_chain", "return_iptables"]

CHAIN = "ingress_return"  # the nft chain's name in ugate's table


def needs_return_routing(cap: Capture) -> bool:
    """Only a TPROXY ingress sidecar whose upstreams leave from the client's address needs it."""
    return cap.role == "ingress" and cap.mode == "tproxy" and cap.preserve_source


def owned_rule(mark: str) -> str:
    """The ingress form of "packets of a connection a transparent socket owns go to it": not for a bare
    SYN. nft's ``socket`` lookup also finds the gate's accepted sockets in TIME_WAIT; a client reusing
    such a connection's port would have its SYN accepted here, the TIME_WAIT socket would hand it to the
    listener of the destination port, which in an ingress sidecar is the app's own, and the connection
    would bypass the gate (with on_failure closed its next packets are dropped: it stalls). Measured
    with ab against nginx, 2000 connections twice: the second run stalled in both modes; with this rule
    both ran 4 x 2000. A bare SYN goes on to the ``tproxy`` rule, which hands TIME_WAIT over to the
    gate's listener (nf_tproxy_handle_time_wait)."""
    return f"meta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 {mark} accept"


def _statements(cap: Capture) -> list[str]:
    own, back = f"{cap.bypass_mark:#x}", f"{cap.route_mark:#x}"
    return [
        f'meta mark {own} ct state new fib saddr type != local fib daddr type local ct mark set {back} '
        'comment "ugate as client"',
        f'meta mark 0x0 ct direction reply ct mark {back} meta mark set {back} '
        'comment "app replies: to ugate"',
    ]


def return_chain(cap: Capture) -> str:
    """The nft chain (text inside ``table inet ugate``) for ``cap``; "" when it needs none."""
    if not needs_return_routing(cap):
        return ""
    lines = [f"  chain {CHAIN} {{", "    type route hook output priority mangle; policy accept;"]
    lines += [f"    {statement}" for statement in _statements(cap)]
    lines.append("  }")
    return "\n".join(lines)


def return_iptables(cap: Capture) -> tuple[IptRule, ...]:
    """The same two rules for the iptables backend, in mangle UGATE_OUT (jumped to from OUTPUT), per
    address family the capture steers."""
    if not needs_return_routing(cap):
        return ()
    own, back = f"{cap.bypass_mark:#x}", f"{cap.route_mark:#x}"
    remember = {"mark": {"mark": own}, "conntrack": {"ctstate": "NEW"},
                "addrtype": {"src-type": "!LOCAL", "dst-type": "LOCAL"},
                "target": {"CONNMARK": {"set-xmark": f"{back}/0xffffffff"}}}
    restore = {"mark": {"mark": "0x0"}, "conntrack": {"ctdir": "REPLY"}, "connmark": {"mark": back},
               "target": {"MARK": {"set-xmark": f"{back}/0xffffffff"}}}
    families = [ipv6 for ipv6, ports in ((False, (cap.port4, cap.udp_port4)), (True, (cap.port6, cap.udp_port6)))
                if any(p is not None for p in ports)]
    return tuple(IptRule(ipv6, "mangle", "UGATE_OUT", tuple(sorted(rule.items())))
                 for ipv6 in families for rule in (remember, restore))
