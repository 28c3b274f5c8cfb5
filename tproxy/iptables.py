"""The iptables backend of capture: the uproxy recipe's mangle/nat chains, through python-iptables.

Rules are data first (``IptRule``: family, table, chain and a python-iptables ``easy`` rule dict) and
render to the iptables command lines ``ugate rules show`` prints. Every chain is ugate's own (UGATE_*),
reached by one jump from a built-in chain, so ``clear`` removes exactly those jumps and chains.
python-iptables drives the legacy x_tables interface (``iptables-legacy-save`` lists what it wrote) and
cannot load a target such as TPROXY for IPv4 and IPv6 in one process, so each address family is applied
or cleared in a child process of its own.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tproxy.capture import Capture

__all__ = ["CHAINS", "IptRule", "apply_iptables", "build_iptables", "clear_iptables"]

# (table, our chain, the built-in chain that jumps to it)
CHAINS = (
    ("mangle", "UGATE_PRE", "PREROUTING"),
    ("mangle", "UGATE_OUT", "OUTPUT"),
    ("nat", "UGATE_PRE", "PREROUTING"),
    ("nat", "UGATE_OUT", "OUTPUT"),
)
HELPER_CHAINS = ("UGATE_CAP", "UGATE_DIVERT")  # reached only from the chains above


@dataclass(frozen=True)
class IptRule:
    ipv6: bool
    table: str
    chain: str
    spec: tuple[tuple[str, Any], ...]  # a python-iptables ``easy`` rule dict, as sorted items

    @property
    def rule(self) -> dict[str, Any]:
        return dict(self.spec)

    def __str__(self) -> str:
        return f"{'ip6tables' if self.ipv6 else 'iptables'} -t {self.table} -A {self.chain} {_render(self.rule)}"


def _render(rule: dict[str, Any]) -> str:
    """The iptables arguments of an ``easy`` rule dict (the subset ugate builds)."""
    words: list[str] = []
    flags = {"protocol": "-p", "in-interface": "-i", "src": "-s", "dst": "-d"}
    for key, flag in flags.items():
        if key in rule:
            value = str(rule[key])
            words += ["!", flag, value[1:]] if value.startswith("!") else [flag, value]
    for key, value in rule.items():
        if key in flags or key == "target":
            continue
        words += ["-m", key]
        for opt, arg in value.items():
            negated = str(arg).startswith("!")
            words += (["!"] if negated else []) + [f"--{opt}"] + ([str(arg).lstrip("!")] if arg != "" else [])
    target = rule["target"]
    if isinstance(target, str):
        words += ["-j", target]
    else:
        (name, opts), = target.items()
        words += ["-j", name]
        for opt, arg in opts.items():
            words += [f"--{opt}", str(arg)]
    return " ".join(words)


def _rule(ipv6: bool, table: str, chain: str, **spec: Any) -> IptRule:
    return IptRule(ipv6, table, chain, tuple(sorted(spec.items())))


def _ports(cap: Capture, proto: str) -> dict[str, Any]:
    if not cap.ports:
        return {"protocol": proto}
    ports = ",".join(f"{lo}:{hi}" if lo != hi else str(lo) for lo, hi in cap.ports)
    return {"protocol": proto, "multiport": {"dports": ports}}


def build_iptables(cap: Capture) -> tuple[IptRule, ...]:
    """The rule list for ``cap`` (jumps from built-in chains are implied by the chains used)."""
    rules: list[IptRule] = []
    mark = f"{cap.route_mark:#x}/{cap.route_mark:#x}"
    set_mark = {"MARK": {"set-xmark": f"{cap.route_mark:#x}/0xffffffff"}}
    marked = {"mark": f"{cap.route_mark:#x}"}
    for ipv6, tcp_port, udp_port in ((False, cap.port4, cap.udp_port4), (True, cap.port6, cap.udp_port6)):
        if tcp_port is None and udp_port is None:
            continue
        version = 6 if ipv6 else 4
        steer = [(p, port) for p, port in (("tcp", tcp_port), ("udp", udp_port)) if port is not None]
        returns: list[dict[str, Any]] = [dict(dst=str(net), target="RETURN") for net in cap.exclude
                                         if net.version == version]
        sources = [str(net) for net in cap.sources if net.version == version]
        table = "mangle" if cap.mode == "tproxy" else "nat"
        if cap.mode == "tproxy":
            divert = [_rule(ipv6, "mangle", "UGATE_DIVERT", target=set_mark),
                      _rule(ipv6, "mangle", "UGATE_DIVERT", target="ACCEPT")]
            owned = [_rule(ipv6, "mangle", "UGATE_PRE", protocol=p, socket={"transparent": ""}, target="UGATE_DIVERT")
                     for p, _ in steer]
            action = [{"TPROXY": {"on-port": str(port), "tproxy-mark": mark}} for _, port in steer]
        else:
            divert, owned = [], []
            action = [{"REDIRECT": {"to-ports": str(port)}} for _, port in steer]
        bypass: dict[str, Any] = dict(mark={"mark": f"{cap.bypass_mark:#x}"}, target="RETURN")
        if cap.role == "egress":
            local: dict[str, Any] = dict(addrtype={"dst-type": "LOCAL"}, target="RETURN")
            out_chain = "UGATE_OUT"
            head = [bypass, local, *returns]
            if cap.mode == "tproxy":
                # Mark locally generated traffic so the policy route loops it over lo into PREROUTING.
                tail = [dict(**_ports(cap, p), target=set_mark) for p, _ in steer]
                pre = [_rule(ipv6, "mangle", "UGATE_PRE", **{"in-interface": "lo"}, mark=marked, **_ports(cap, p),
                             target=a) for (p, _), a in zip(steer, action, strict=True)]
                rules += [*divert, *owned, *pre]
            else:
                tail = [dict(**_ports(cap, p), target=a) for (p, _), a in zip(steer, action, strict=True)]
            rules += _with_sources(ipv6, table, out_chain, head, tail, sources)
        else:
            local = dict(addrtype={"dst-type": "LOCAL" if cap.role == "router" else "!LOCAL"}, target="RETURN")
            head = [bypass, local, *returns]
            ifaces = cap.interfaces or ("",)
            tail = [dict(**({"in-interface": i} if i else {}), **_ports(cap, p), target=a)
                    for i in ifaces for (p, _), a in zip(steer, action, strict=True)]
            rules += [*divert, *owned, *_with_sources(ipv6, table, "UGATE_PRE", head, tail, sources)]
    return tuple(rules)


def _with_sources(ipv6: bool, table: str, chain: str, head: list[dict[str, Any]], tail: list[dict[str, Any]],
                  sources: list[str]) -> list[IptRule]:
    """``head`` in ``chain``; ``tail`` there too, or in UGATE_CAP reached once per allowed source."""
    out = [_rule(ipv6, table, chain, **r) for r in head]
    if not sources:
        return out + [_rule(ipv6, table, chain, **r) for r in tail]
    out += [_rule(ipv6, table, chain, src=s, target="UGATE_CAP") for s in sources]
    return out + [_rule(ipv6, table, "UGATE_CAP", **r) for r in tail]


# -- applying ----------------------------------------------------------------------------------


def _in_child(fn: Callable[[bool, tuple[IptRule, ...]], None], ipv6: bool, rules: tuple[IptRule, ...]) -> None:
    ctx = multiprocessing.get_context("fork")
    errors = ctx.SimpleQueue()

    def run() -> None:
        try:
            fn(ipv6, rules)
        except Exception as e:  # reported to the parent, which raises it as OSError
            errors.put(f"{type(e).__name__}: {e}")

    child = ctx.Process(target=run)
    child.start()
    child.join()
    if not errors.empty():
        raise OSError(f"iptables ({'IPv6' if ipv6 else 'IPv4'}): {errors.get()}")
    if child.exitcode:
        raise OSError(f"iptables ({'IPv6' if ipv6 else 'IPv4'}): helper exited with {child.exitcode}")


def _clear_family(ipv6: bool, _rules: tuple[IptRule, ...]) -> None:
    from iptc import easy

    ours = {chain for _, chain, _ in CHAINS} | set(HELPER_CHAINS)
    for table in ("mangle", "nat"):
        for _, _, builtin in [c for c in CHAINS if c[0] == table]:
            for rule in easy.dump_chain(table, builtin, ipv6=ipv6):
                if rule.get("target") in ours:
                    easy.delete_rule(table, builtin, rule, ipv6=ipv6)
        existing = easy.get_chains(table, ipv6=ipv6)
        for chain in ours & set(existing):
            easy.flush_chain(table, chain, ipv6=ipv6)
        for chain in ours & set(existing):
            easy.delete_chain(table, chain, ipv6=ipv6, flush=True)


def _apply_family(ipv6: bool, rules: tuple[IptRule, ...]) -> None:
    from iptc import easy

    mine = [r for r in rules if r.ipv6 == ipv6]
    chains = list(dict.fromkeys((r.table, r.chain) for r in mine))
    for table, chain in chains:
        easy.add_chain(table, chain, ipv6=ipv6)
    for rule in mine:
        easy.add_rule(rule.table, rule.chain, rule.rule, ipv6=ipv6)
    for table, chain, builtin in CHAINS:
        if (table, chain) in chains:
            easy.insert_rule(table, builtin, {"target": chain}, ipv6=ipv6)


def clear_iptables() -> None:
    for ipv6 in (False, True):
        _in_child(_clear_family, ipv6, ())


def apply_iptables(rules: tuple[IptRule, ...]) -> None:
    clear_iptables()
    for ipv6 in (False, True):
        if any(r.ipv6 == ipv6 for r in rules):
            _in_child(_apply_family, ipv6, rules)
