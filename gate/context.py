"""What every listener, mesh stream and UDP session of one process shares, and where every flow ends.

Built once by the app. ``finish(flow)`` is the only place a flow ends: TCP relays, forwarded HTTP
requests, mesh-served streams and UDP sessions all come here, so the access log and the metrics see
each flow exactly once; ``live`` holds the flows not ended yet (the admin API's list).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.config import GateConfig
from gate.flow import Close, Flow, FlowState
from gate.metrics import Metrics
from gate.router import Router
from gate.sniffing import SniffOutcomes

if TYPE_CHECKING:
    from gate.mesh.transport import Transport

__all__ = ["Context"]

log = logging.getLogger("ugate")


@dataclass(eq=False)
class Context:
    """What listeners share, built once by the app."""

    router: Router
    access_log: AccessLog
    reuse_port: bool = False
    mark: int | None = None  # SO_MARK of upstream sockets (the capture rules skip it)
    own: frozenset[Endpoint] = frozenset()  # our listeners' addresses: never a destination
    mesh: Transport | None = None  # tunnels to peer gates (routes with via:)
    sniff_outcomes: SniffOutcomes = field(default_factory=SniffOutcomes)
    live: dict[int, Flow] = field(default_factory=dict)  # every flow not finished yet, by id
    metrics: Metrics = field(default_factory=Metrics)  # counted here, in finish; read by the admin listener
    config: GateConfig | None = None  # the running config (the admin API shows and explains it)

    def begin(self, flow: Flow) -> Flow:
        """Register a new flow (the live table the admin API will list)."""
        self.live[flow.id] = flow
        return flow

    def finish(self, flow: Flow, close: Close | None = None, detail: str | None = None) -> None:
        """End ``flow``: its reason (if none was given before), then its one access-log record."""
        if flow.state is FlowState.DONE:
            return
        if close is not None:
            flow.closing(close, detail)
        elif flow.close is None:
            flow.closing(Close.INTERNAL, "ended without a reason")
        flow.state = FlowState.DONE
        self.live.pop(flow.id, None)
        self.metrics.finished(flow)
        if self.access_log.enabled:
            self.access_log.write(flow.record())
