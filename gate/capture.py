"""The config's ``capture:`` section as tproxy rule sets: show, apply, clear, and apply-for-a-run."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from gate.config import GateConfig, TproxyUdpSpec
from gate.router import bypass_routes
from tproxy.offload import Bypass
from tproxy.rules import Capture, OwnedTable, RuleSet, apply, build, clear, replace

__all__ = ["Captured", "applied", "bypass_of", "capture_of", "fastpath_of", "rules_of"]

_CAPTURED_KINDS = ("tproxy", "tproxy_udp")


def _offload_possible(config: GateConfig) -> bool:
    """The kernel can take flows over: TPROXY capture with nftables, as router or egress (ingress has
    its own return routing), and no captured listener whose clients speak PROXY protocol first (the
    kernel would forward the header to the server)."""
    spec = config.capture
    return (spec is not None and spec.mode == "tproxy" and spec.backend == "nftables"
            and spec.role in ("router", "egress")
            and not any(s.proxy_protocol_from for s in config.listeners if s.kind in _CAPTURED_KINDS))


def bypass_of(config: GateConfig) -> tuple[Bypass, ...]:
    """The routes compiled into the capture rules as "do not capture" (gate.router.bypass_routes)."""
    if not _offload_possible(config):
        return ()
    return tuple(Bypass(r.name, r.match.dst, r.match.src, r.match.port) for r in bypass_routes(config.routes))


def fastpath_of(config: GateConfig) -> tuple[tuple[int, float], ...]:
    """(IP version, session_timeout) of the captured tproxy_udp listeners, when some route may offload
    UDP sessions to the kernel (router role only: an egress client's own socket holds its address)."""
    spec = config.capture
    # on_failure open: the table belongs to the gate's owner socket, which alone may add elements
    if not _offload_possible(config) or spec is None or spec.role != "router" or spec.on_failure != "closed":
        return ()
    if not any(route.offloadable for route in config.routes):
        return ()
    out = []
    for version, port in ((4, spec.udp_port4), (6, spec.udp_port6)):
        udp = [s for s in config.listeners if isinstance(s, TproxyUdpSpec) and s.listen.port == port
               and (":" in s.listen.host) == (version == 6)]
        if port is not None and udp:
            out.append((version, udp[0].session_timeout))
    return tuple(out)

log = logging.getLogger("ugate")


def capture_of(config: GateConfig) -> Capture | None:
    spec = config.capture
    if spec is None:
        return None
    assert config.mark is not None  # the config gives capture a default bypass mark
    return Capture(mode=spec.mode, role=spec.role, port4=spec.port4, port6=spec.port6, bypass_mark=config.mark,
                   route_mark=spec.route_mark, table=spec.table, udp_port4=spec.udp_port4,
                   # any upstream may leave from a client's address: an ingress needs return routing
                   preserve_source=any(s.preserve_source for s in config.listeners)
                   or any(r.preserve_source for r in config.routes),
                   udp_port6=spec.udp_port6, backend=spec.backend, interfaces=spec.interfaces, ports=spec.ports,
                   exclude=spec.exclude, sources=spec.sources, on_failure=spec.on_failure,
                   fastpath=fastpath_of(config), bypass=bypass_of(config),
                   udp_owned=bool(spec.udp_port4 or spec.udp_port6) and spec.mode == "tproxy"
                   and spec.role == "router" and (any(r.preserve_source for r in config.routes)
                                                  or any(s.preserve_source for s in config.listeners
                                                         if isinstance(s, TproxyUdpSpec))))


def rules_of(config: GateConfig) -> tuple[Capture, RuleSet] | None:
    cap = capture_of(config)
    return None if cap is None else (cap, build(cap))


class Captured:
    """The capture rules a run applied: replaced by a reload, cleared at exit (unless a successor that
    took our listening sockets over keeps them: ``keep``)."""

    def __init__(self, cap: Capture, owned: OwnedTable | None) -> None:
        self.cap = cap
        self.owned = owned
        self.keep = False

    @property
    def fds(self) -> frozenset[int]:
        """Descriptors a forked worker closes (the socket owning a held table)."""
        return self.owned.fds if self.owned is not None else frozenset()

    def replace(self, config: GateConfig) -> None:
        """Swap the rules for ``config``'s in one nftables transaction (OSError: the old ones stay)."""
        found = rules_of(config)
        if found is None or config.capture is None or config.capture.apply != "auto":
            if self.owned is not None:  # the section is gone, or its rules are no longer the gate's to apply
                self.owned.close()
                self.owned = None
            clear(self.cap)
            log.info("capture rules cleared (the config no longer has the gate apply them)")
            return
        cap, rules = found
        self.owned = replace(self.cap, rules, cap, self.owned)
        self.cap = cap
        log.info("capture rules replaced in one transaction (%s, %s, on_failure %s)", cap.mode, cap.role,
                 cap.on_failure)

    def clear(self) -> None:
        if self.keep:
            if self.owned is not None:  # a held table dies with us anyway; the successor re-applies it
                self.owned.release()
            log.info("capture rules left in place for the gate that took over")
            return
        if self.owned is not None:
            self.owned.close()
        clear(self.cap)
        log.info("capture rules cleared")


@contextlib.contextmanager
def applied(config: GateConfig) -> Iterator[Captured | None]:
    """With ``capture.apply: auto``: install the rules for the run, and clear them however it ends."""
    found = rules_of(config)
    if found is None or config.capture is None or config.capture.apply != "auto":
        yield None
        return
    cap, rules = found
    owned = apply(rules, cap)
    log.info("capture rules applied (%s, %s, on_failure %s)", cap.mode, cap.role, cap.on_failure)
    captured = Captured(cap, owned)
    try:
        yield captured
    finally:
        captured.clear()
