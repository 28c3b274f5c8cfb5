"""The config's ``capture:`` section as tproxy rule sets: show, apply, clear, and apply-for-a-run."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from gate.config import GateConfig
from tproxy.rules import Capture, OwnedTable, RuleSet, apply, build, clear

__all__ = ["applied", "capture_of", "rules_of"]

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
                   exclude=spec.exclude, sources=spec.sources, on_failure=spec.on_failure)


def rules_of(config: GateConfig) -> tuple[Capture, RuleSet] | None:
    cap = capture_of(config)
    return None if cap is None else (cap, build(cap))


@contextlib.contextmanager
def applied(config: GateConfig) -> Iterator[OwnedTable | None]:
    """With ``capture.apply: auto``: install the rules for the run, and clear them however it ends.

    Yields the OwnedTable holding the rules with ``on_failure: open`` (forked workers close its sockets).
    """
    found = rules_of(config)
    if found is None or config.capture is None or config.capture.apply != "auto":
        yield None
        return
    cap, rules = found
    owned = apply(rules, cap)
    log.info("capture rules applied (%s, %s, on_failure %s)", cap.mode, cap.role, cap.on_failure)
    try:
        yield owned
    finally:
        if owned is not None:
            owned.close()
        clear(cap)
        log.info("capture rules cleared")
