"""Firewall and policy-routing rule sets for capture, built as plain data first, applied and cleared apart.

``build`` turns a capture spec into a RuleSet (an nftables script for one ``inet`` table owned by ugate,
plus ``ip rule`` / ``ip route`` entries for TPROXY); a test compares that without root. ``apply`` and
``clear`` change the current network namespace; everything they add is recognisable as ugate's (the
table name, the route protocol number 117 on both the routes and the ip rules), so ``clear`` removes
exactly that, also after a crash (``apply`` clears first), and leaves anyone else's alike rules alone.

What captured traffic does while no gate serves (``on_failure``), from the kernel's behaviour:
- nft ``tproxy`` with no socket on the port does nothing (the rule stops matching, evaluation goes on),
  so without more rules a dead gate's traffic would pass uncaptured (router, ingress) or be looped to
  lo and reset (egress). ``closed`` follows every ``tproxy`` rule with a ``drop`` of the same match:
  only what no transparent socket took reaches it. iptables' TPROXY target drops by itself.
  REDIRECT always rewrites the destination; with nothing listening the client is refused (RST).
- ``open`` creates the table with ``flags owner``: the kernel deletes an owned table when the netlink
  socket that created it closes, i.e. when the gate process ends however it ends (kill -9 included).
  The gate holds that socket for its run (``OwnedTable``, libnftables in-process). The policy routing it
  leaves behind only concerns packets the table marked, so it is inert until the next ``apply``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from tproxy.capture import Capture
from tproxy.ingress import owned_rule, return_chain, return_iptables
from tproxy.iptables import build_iptables, clear_iptables
from tproxy.offload import bypass_sets, bypass_statements, fastpath_sets, fastpath_skip

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["NFT_TABLE", "RT_PROTO", "Capture", "IpRule", "LocalRoute", "OwnedTable", "RuleSet", "apply", "build",
           "clear", "replace", "replace_script"]

NFT_TABLE = "ugate"  # `table inet ugate`: ours alone, created and deleted whole
RT_PROTO = 117  # rtm_protocol of our routes and ip rules (ASCII "u"): how clear() knows them
RULE_PRIORITY = 32000  # before the main table (32766)


@dataclass(frozen=True)
class IpRule:
    family: int
    fwmark: int
    table: int
    priority: int = RULE_PRIORITY

    def __str__(self) -> str:
        ip = "ip -6" if self.family == socket.AF_INET6 else "ip"
        return f"{ip} rule add fwmark {self.fwmark:#x} lookup {self.table} priority {self.priority} proto {RT_PROTO}"


@dataclass(frozen=True)
class LocalRoute:
    """``local <any> dev lo table N``: marked packets are delivered to local (transparent) sockets."""

    family: int
    table: int

    def __str__(self) -> str:
        ip, dst = ("ip -6", "::/0") if self.family == socket.AF_INET6 else ("ip", "0.0.0.0/0")
        return f"{ip} route add local {dst} dev lo table {self.table} proto {RT_PROTO}"


@dataclass(frozen=True)
class RuleSet:
    nft: str  # the nftables script, or "" with the iptables backend
    ip_rules: tuple[IpRule, ...] = ()
    routes: tuple[LocalRoute, ...] = ()
    iptables: tuple[Any, ...] = ()  # tproxy.iptables.IptRule, with the iptables backend
    held: bool = False  # the nft table has ``flags owner``: it lives as long as the process that applied it

    def show(self) -> str:
        """What ``ugate rules show`` prints: exactly what ``apply`` installs."""
        if self.iptables:
            lines = ["# iptables (python-iptables, legacy x_tables; each chain jumped to from its built-in)",
                     *map(str, self.iptables)]
        else:
            lines = ["# nftables (nft -f -)", self.nft.rstrip()]
        if self.ip_rules or self.routes:
            lines += ["", "# policy routing (applied through pyroute2)"]
            lines += [*map(str, self.ip_rules), *map(str, self.routes)]
        return "\n".join(lines) + "\n"


def _set(items: Iterable[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _ports(ports: tuple[tuple[int, int], ...]) -> str:
    return _set(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ports)


def _family_filters(cap: Capture, version: int) -> list[str]:
    """Statements that end in ``return`` for traffic this family must not capture."""
    ip = "ip" if version == 4 else "ip6"
    out = []
    excluded = [str(n) for n in cap.exclude if n.version == version]
    if excluded:
        out.append(f"meta nfproto ipv{version} {ip} daddr {_set(excluded)} return")
    sources = [str(n) for n in cap.sources if n.version == version]
    if sources:
        out.append(f"meta nfproto ipv{version} {ip} saddr != {_set(sources)} return")
    return out


def _match(cap: Capture, proto: str = "tcp") -> str:
    """The protocol part every capturing statement shares."""
    dport = f" {proto} dport {_ports(cap.ports)}" if cap.ports else ""
    return f"meta l4proto {proto}{dport}"


def _drop(statement: str) -> str:
    """The ``closed`` twin of a steering statement: the same match, dropped, for what no socket took."""
    match = statement.split(" tproxy ", 1)[0]
    return f'{match} drop comment "no gate serves: on_failure closed"'


def _chain(name: str, kind: str, hook: str, prio: str, body: list[str]) -> str:
    lines = [f"  chain {name} {{", f"    type {kind} hook {hook} priority {prio}; policy accept;"]
    lines += [f"    {statement}" for statement in body]
    lines.append("  }")
    return "\n".join(lines)


def _steer(cap: Capture, action4: str, action6: str) -> list[str]:
    out = []
    for proto, port4, port6 in (("tcp", cap.port4, cap.port6), ("udp", cap.udp_port4, cap.udp_port6)):
        for version, port, action in ((4, port4, action4), (6, port6, action6)):
            if port is not None:
                out.append(f"meta nfproto ipv{version} {_match(cap, proto)} {action.format(port=port)}")
    return out


def build(cap: Capture) -> RuleSet:
    """The rule set for ``cap``; pure, so tests compare it as text."""
    iif = f"iifname {_set(chr(34) + i + chr(34) for i in cap.interfaces)} " if cap.interfaces else ""
    filters = _family_filters(cap, 4) + _family_filters(cap, 6)
    skip_own = f"meta mark {cap.bypass_mark:#x} return"
    mark = f"meta mark set {cap.route_mark:#x}"
    chains = []
    if cap.mode == "tproxy":
        tproxy = (f"tproxy ip to :{{port}} {mark} accept", f"tproxy ip6 to :{{port}} {mark} accept")
        # Packets of connections a transparent socket already owns (incl. replies to source-preserving
        # upstream sockets) go to that socket, not to the listener.
        owned = f"meta l4proto tcp socket transparent 1 {mark} accept"
        if cap.role == "egress":
            # Locally generated: mark in OUTPUT so the policy route sends it over lo, where PREROUTING
            # hands it to the listener.
            udp = [f"{_match(cap, 'udp')} {mark}"] if cap.udp_port4 or cap.udp_port6 else []
            out = [skip_own, "fib daddr type local return", *filters, *bypass_statements(cap.bypass),
                   f"{_match(cap)} {mark}", *udp]
            chains.append(_chain("output", "route", "output", "mangle", out))
            steer = [f'iifname "lo" meta mark {cap.route_mark:#x} {s}' for s in _steer(cap, *tproxy)]
            pre = [owned]
        else:
            if cap.role == "ingress":  # a bare SYN must reach the tproxy rule (see tproxy.ingress)
                owned = owned_rule(mark)
            local = "fib daddr type local return" if cap.role == "router" else "fib daddr type != local return"
            steer = [f"{iif}{s}" for s in _steer(cap, *tproxy)]
            pre = [owned, skip_own, local, *filters]
            if cap.role == "router":
                # first: an offloaded session's packets would otherwise reach its still-open sockets
                fast = [fastpath_skip(version) for version, _ in cap.fastpath]
                udp_owned = [owned.replace("l4proto tcp", "l4proto udp")] if cap.udp_owned else []
                pre = [*fast, owned, *udp_owned, skip_own, local, *filters, *bypass_statements(cap.bypass)]
        pre += steer
        if cap.on_failure == "closed":
            pre += [_drop(s) for s in steer]
        chains.insert(0, _chain("prerouting", "filter", "prerouting", "mangle", pre))
        families = [f for f, ports in ((socket.AF_INET, (cap.port4, cap.udp_port4)),
                                       (socket.AF_INET6, (cap.port6, cap.udp_port6))) if any(ports)]
        rules = tuple(IpRule(f, cap.route_mark, cap.table) for f in families)
        routes = tuple(LocalRoute(f, cap.table) for f in families)
    else:
        redirect = ("redirect to :{port}", "redirect to :{port}")
        if cap.role == "egress":
            out = [skip_own, "fib daddr type local return", *filters, *_steer(cap, *redirect)]
            chains.append(_chain("output", "nat", "output", "-100", out))
        else:
            local = "fib daddr type local return" if cap.role == "router" else "fib daddr type != local return"
            pre = [local, *filters, *[f"{iif}{s}" for s in _steer(cap, *redirect)]]
            chains.append(_chain("prerouting", "nat", "prerouting", "dstnat", pre))
        rules, routes = (), ()
    if returning := return_chain(cap):  # ingress with preserve_source: the app's replies come back to us
        chains.append(returning)
    if cap.backend == "iptables":
        if cap.fastpath or cap.bypass:
            raise ValueError("the kernel fast path and address-only bypass are nftables-only")
        if cap.on_failure == "open":
            raise ValueError("on_failure open needs the nftables backend")  # the config refuses it
        return RuleSet(nft="", ip_rules=rules, routes=routes, iptables=build_iptables(cap) + return_iptables(cap))
    held = cap.on_failure == "open"
    owner = ["  flags owner"] if held else []
    sets = fastpath_sets(dict(cap.fastpath)) if cap.mode == "tproxy" and cap.role == "router" else []
    if cap.mode == "tproxy" and cap.role in ("router", "egress"):  # where bypass_statements are written
        sets += bypass_sets(cap.bypass)
    nft = f"table inet {NFT_TABLE} {{\n" + "\n".join([*owner, *sets, *chains]) + "\n}\n"
    return RuleSet(nft=nft, ip_rules=rules, routes=routes, held=held)


# -- applying (needs CAP_NET_ADMIN in the namespace) ---------------------------------------------


def _nft(script: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True)
    if done.returncode != 0:
        if "Operation not permitted" in done.stderr or "Operation not supported" in done.stderr:
            raise OSError(f"table inet {NFT_TABLE} is held by a running gate (on_failure: open): stop that gate "
                          f"to remove it ({done.stderr.strip()})")
        raise OSError(f"nft failed: {done.stderr.strip()}")


def _socket_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
        except OSError:  # the descriptor listdir itself used, closed by now
            pass
    return fds


class OwnedTable:
    """Holds the netlink socket that owns ugate's table (nft ``flags owner``, Linux 5.12+).

    The kernel deletes an owned table when that socket closes, so the table cannot outlive this process:
    what ``on_failure: open`` needs. libnftables runs in-process (through ctypes) because the ``nft`` tool
    would own the table only until it exits. Only this socket may change or delete the table.
    """

    def __init__(self) -> None:
        self._lib = ctypes.CDLL("libnftables.so.1")
        self._lib.nft_ctx_new.restype = ctypes.c_void_p
        self._lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        self._lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        self._lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self._lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        self._lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        before = _socket_fds()
        self._ctx: int | None = self._lib.nft_ctx_new(0)  # opens its netlink socket now, keeps it until freed
        if not self._ctx:
            raise OSError("libnftables: cannot create a context")
        self._lib.nft_ctx_buffer_error(self._ctx)
        # A forked worker inherits the socket; it closes these so the table dies with this process alone.
        self.fds = frozenset(_socket_fds() - before)

    def run(self, script: str) -> None:
        if self._ctx is None:
            raise ValueError("closed")
        if self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode()) != 0:
            error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            raise OSError(f"nft failed: {error.strip()}")

    def release(self) -> None:
        """Free the socket, leaving the table (no longer ``flags owner``) in place."""
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        """Delete the table (if it was created) and release the socket."""
        if self._ctx is None:
            return
        try:
            self.run(f"delete table inet {NFT_TABLE}\n")
        except OSError:
            pass  # never created (the apply failed): releasing the socket is all there is to do
        finally:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def _local_route(family: int, table: int, oif: int) -> dict[str, Any]:
    """pyroute2 arguments of ``local default dev lo table N`` (IPv4 local routes need host scope)."""
    args: dict[str, Any] = {"family": family, "dst": "::" if family == socket.AF_INET6 else "0.0.0.0",
                            "dst_len": 0, "table": table, "type": "local", "oif": oif, "proto": RT_PROTO}
    if family == socket.AF_INET:
        args["scope"] = 254  # RT_SCOPE_HOST
    return args


def _netlink_errors_as_oserror(fn: Callable[P, R]) -> Callable[P, R]:
    """pyroute2's NetlinkError is not an OSError; callers handle one kind of failure."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from pyroute2 import NetlinkError

        try:
            return fn(*args, **kwargs)
        except NetlinkError as e:
            raise OSError(e.code, f"netlink: {e}") from None

    return wrapper


@_netlink_errors_as_oserror
def clear(cap: Capture) -> None:
    """Remove ugate's table (or chains), ip rules and local routes from this namespace (idempotent).

    Rules and routes are ugate's by their protocol (RT_PROTO); another tool's ``fwmark 0x1 lookup 100``
    stays. A table held by a running gate (on_failure: open) cannot be removed from here: OSError.
    """
    if cap.backend == "iptables":

        clear_iptables()
    else:
        # "add" then "delete" is nft's idiom for "delete if it exists".
        _nft(f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
    _clear_routing(cap)


def _clear_routing(cap: Capture) -> None:
    """Our ip rules and the local routes of ``cap.table`` (ours by RT_PROTO)."""
    from pyroute2 import IPRoute  # imported here: only apply/clear need netlink

    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for rule in ipr.get_rules(family=family):
                if rule.get_attr("FRA_PROTOCOL") == RT_PROTO:
                    ipr.rule("del", family=family, table=rule.get("table") or rule.get_attr("FRA_TABLE"),
                             fwmark=rule.get_attr("FRA_FWMARK"), priority=rule.get_attr("FRA_PRIORITY"),
                             protocol=RT_PROTO)
            for route in ipr.get_routes(family=family, table=cap.table):
                if route["proto"] == RT_PROTO and route.get_attr("RTA_TABLE") == cap.table:
                    ipr.route("del", **_local_route(family, cap.table, route.get_attr("RTA_OIF")))


@_netlink_errors_as_oserror
def apply(rules: RuleSet, cap: Capture) -> OwnedTable | None:
    """Install ``rules`` after clearing what an earlier run may have left.

    With ``rules.held`` the table belongs to the returned OwnedTable: keep it for as long as the rules
    should live, and ``close`` it (then ``clear``) to remove them.
    """
    clear(cap)
    owned = None
    if rules.iptables:
        from tproxy.iptables import apply_iptables

        apply_iptables(rules.iptables)
    elif rules.held:
        owned = OwnedTable()
        try:
            owned.run(rules.nft)
        except OSError:
            owned.close()
            raise
    else:
        _nft(rules.nft)
    _add_routing(rules)
    return owned


def _add_routing(rules: RuleSet) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for rule in rules.ip_rules:
            ipr.rule("add", family=rule.family, fwmark=rule.fwmark, table=rule.table, priority=rule.priority,
                     protocol=RT_PROTO)
        for route in rules.routes:
            ipr.route("add", **_local_route(route.family, route.table, lo))


def replace_script(rules: RuleSet, created: bool = True) -> str:
    """One nft script that swaps ugate's table for ``rules``' in one transaction: the kernel applies the
    delete and the new table together or not at all, so no packet sees the ruleset half-changed or empty.
    ``created``: the table exists for sure (else it is created first, nft's "delete if it exists")."""
    return ("" if created else f"add table inet {NFT_TABLE}\n") + f"delete table inet {NFT_TABLE}\n" + rules.nft


@_netlink_errors_as_oserror
def replace(old: Capture, rules: RuleSet, cap: Capture, owned: OwnedTable | None) -> OwnedTable | None:
    """Swap the applied rules of ``old`` for ``rules`` (a reload); returns the OwnedTable now holding them.

    nftables: one transaction (``replace_script``), through the socket that owns a held table. The ip
    rules and local routes change only if they differ (removed, then added: marked packets routed in
    between take the main table). The iptables backend has no transaction spanning its tables: cleared,
    then applied."""
    if old.backend == "iptables" or cap.backend == "iptables":
        if owned is not None:
            owned.close()
        clear(old)
        return apply(rules, cap)
    holder = owned
    if rules.held and holder is None:
        holder = OwnedTable()
    try:
        if holder is not None:
            holder.run(replace_script(rules, created=owned is not None))
        else:
            _nft(replace_script(rules, created=False))
    except OSError:
        if holder is not owned and holder is not None:
            holder.close()
        raise
    if holder is not None and not rules.held:  # the table is no longer held: release the owner socket
        holder.release()
        holder = None
    if build(old).ip_rules != rules.ip_rules or build(old).routes != rules.routes:
        _clear_routing(old)
        _add_routing(rules)
    return holder
