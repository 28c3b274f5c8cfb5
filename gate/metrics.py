"""The gate's Prometheus metrics: plain counters bumped where a flow ends, turned into the exposition
format only when scraped.

A flow's end costs a few dict increments (``Metrics.finished``, called by ``Context.finish``); nothing is
counted per chunk: bytes are added when the flow ends, and live flows' bytes are read from their relays
at scrape time. Scrape-time values (active flows, sniff outcomes, mesh peers) are computed from the
live registry by ``snapshot``. A snapshot is plain JSON, so the worker that answers a scrape can sum
its siblings' (``merge``) before ``render`` writes the text with prometheus-client.

Label values come from the config (listener, route and peer names) or from closed vocabularies (actions,
close reasons, protocols, directions, error kinds), never from client input, so the number of series is
bounded by the config.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gate.flow import Close, Flow

__all__ = ["DIAL_ERRORS", "METRICS", "MetricDef", "Metrics", "Snapshot", "merge", "render"]

Snapshot = dict[str, list[list[Any]]]  # metric name -> [label values..., value] rows (JSON-able)


@dataclass(frozen=True)
class MetricDef:
    """One metric family: counters are named without ``_total`` (the exposition adds it); ``agg`` says how
    workers' values combine into one scrape: "sum", "min" (a start time) or "max"."""

    kind: str  # "counter" | "gauge" | "info"
    help: str
    labels: tuple[str, ...] = ()
    agg: str = "sum"


METRICS: dict[str, MetricDef] = {m_name: m for m_name, m in (
    ("ugate_flows_active", MetricDef("gauge", "Flows open now (handshake to relay), by listener and state.",
                                     ("listener", "state"))),
    ("ugate_flows", MetricDef("counter", "Flows ended, by listener, route, action and close reason.",
                              ("listener", "route", "action", "close"))),
    ("ugate_flow_bytes", MetricDef("counter", "Bytes relayed by ended flows; up is client to upstream.",
                                   ("listener", "route", "direction"))),
    ("ugate_flows_active_bytes", MetricDef("gauge", "Bytes relayed so far by flows still open.",
                                           ("listener", "direction"))),
    ("ugate_dial_errors", MetricDef("counter", "Upstream connection attempts that failed, by kind.", ("kind",))),
    ("ugate_timeouts", MetricDef("counter", "Flows whose client said too little in time: a handshake that did "
                                            "not finish (flow ended) or a sniff that routed on addresses alone.",
                                 ("phase",))),
    ("ugate_sniff_outcomes", MetricDef("counter", "How sniffing ended: a protocol, miss, timeout or empty.",
                                       ("outcome",))),
    ("ugate_udp_sessions_active", MetricDef("gauge", "UDP sessions open now, by listener.", ("listener",))),
    ("ugate_udp_sessions", MetricDef("counter", "UDP sessions ended, by listener.", ("listener",))),
    ("ugate_mesh_peer_up", MetricDef("gauge", "1 when a tunnel to the peer is up (in any worker), else 0.",
                                     ("peer",), agg="max")),
    ("ugate_mesh_streams", MetricDef("gauge", "Mesh streams open now, by peer and transport.",
                                     ("peer", "transport"))),
    ("ugate_capture_rules", MetricDef("gauge", "Capture rules this gate installed and holds (0: none).",
                                      ("backend",), agg="max")),
    ("ugate_process_cpu_seconds", MetricDef("counter", "CPU time of the gate's processes (user and system).")),
    ("ugate_process_resident_memory_bytes", MetricDef("gauge", "Resident memory of the gate's processes.")),
    ("ugate_process_open_fds", MetricDef("gauge", "Open file descriptors of the gate's processes.")),
    ("ugate_process_start_time_seconds", MetricDef("gauge", "Start of the oldest gate process (Unix time).",
                                                   agg="min")),
    ("ugate_workers", MetricDef("gauge", "Processes whose numbers this scrape sums.")),
    ("ugate_build", MetricDef("info", "The running ugate version.", ("version",), agg="max")),
)}

# Failed upstream connection attempts by kind ("refused", "timeout", "unreachable", "dns"), counted by
# gate.dial where the attempt fails: a name with several addresses may fail more than once for one flow.
DIAL_ERRORS: collections.Counter[str] = collections.Counter()
_START = time.time()


class Metrics:
    """One process's counters. ``finished(flow)`` is the whole hot-path cost."""

    def __init__(self, version: str = "") -> None:
        self.version = version
        # plain dicts keyed by the enums' text (str() of a StrEnum is C code; Enum.__hash__ is a Python
        # call): half the cost of Counters keyed by the enums, measured
        self.flows: dict[tuple[str, str, str, str], int] = {}  # listener, route, action, close -> ended flows
        self.bytes: dict[tuple[str, str], list[int]] = {}  # listener, route -> [up, down] of ended flows
        self.handshake_timeouts = 0
        self.udp_sessions: dict[str, int] = {}
        self.capture: tuple[str, int] | None = None  # (backend, rules) installed by this gate

    def finished(self, flow: Flow) -> None:
        """Count an ended flow (Context.finish calls this exactly once per flow)."""
        action, close, route = flow.action, flow.close, flow.rule or ""
        key = (flow.listener, route, str(action) if action is not None else "", str(close) if close is not None else "")
        flows = self.flows
        flows[key] = flows.get(key, 0) + 1
        up, down = flow.bytes_up, flow.bytes_down
        if up or down:
            counted = self.bytes.get((flow.listener, route))
            if counted is None:
                self.bytes[flow.listener, route] = [up, down]
            else:
                counted[0] += up
                counted[1] += down
        if close is Close.HANDSHAKE_TIMEOUT:
            self.handshake_timeouts += 1
        if flow.path == "udp":
            self.udp_sessions[flow.listener] = self.udp_sessions.get(flow.listener, 0) + 1

    def snapshot(self, live: Iterable[Flow], sniffed: Mapping[str, int],
                 peers: Iterable[tuple[str, bool, Mapping[str, int]]] = ()) -> Snapshot:
        """This process's values: the counters, plus what is computed from the live flows now.

        ``peers``: (name, tunnel up, open streams by transport) of each configured mesh peer."""
        active: collections.Counter[tuple[str, str]] = collections.Counter()
        active_bytes: collections.Counter[tuple[str, str]] = collections.Counter()
        udp: collections.Counter[str] = collections.Counter()
        for flow in live:
            active[flow.listener, flow.state.name.lower()] += 1
            up, down = live_bytes(flow)
            active_bytes[flow.listener, "up"] += up
            active_bytes[flow.listener, "down"] += down
            if flow.path == "udp":
                udp[flow.listener] += 1
        out: Snapshot = {
            "ugate_flows_active": _rows(active),
            "ugate_flows": _rows(self.flows),
            "ugate_flow_bytes": [[listener, route, direction, n] for (listener, route), pair in self.bytes.items()
                                 for direction, n in zip(("up", "down"), pair, strict=True)],
            "ugate_flows_active_bytes": _rows(active_bytes),
            "ugate_dial_errors": _rows(DIAL_ERRORS),
            "ugate_timeouts": [["handshake", self.handshake_timeouts], ["sniff", sniffed.get("timeout", 0)]],
            "ugate_sniff_outcomes": [[k, v] for k, v in sorted(sniffed.items())],
            "ugate_udp_sessions_active": _rows(udp),
            "ugate_udp_sessions": _rows(self.udp_sessions),
            "ugate_mesh_peer_up": [],
            "ugate_mesh_streams": [],
            "ugate_capture_rules": [list(self.capture)] if self.capture else [],
            "ugate_workers": [[1]],
            "ugate_build": [[self.version or _version(), 1]],
            **_process(),
        }
        for name, up, streams in peers:
            out["ugate_mesh_peer_up"].append([name, int(up)])
            out["ugate_mesh_streams"] += [[name, transport, n] for transport, n in sorted(streams.items())]
        return out


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("ugate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def live_bytes(flow: Flow) -> tuple[int, int]:
    """Bytes a flow moved so far: what it counted plus what its running relay counts."""
    relay = flow.relay
    if relay is None:
        return flow.bytes_up, flow.bytes_down
    return flow.bytes_up + relay.bytes_up, flow.bytes_down + relay.bytes_down


def _rows(counter: Mapping[Any, int]) -> list[list[Any]]:
    return [[*(key if isinstance(key, tuple) else (key,)), value] for key, value in counter.items()]


def _process() -> Snapshot:
    """The process's CPU, memory and descriptors, read from the kernel (Linux /proc)."""
    times = os.times()
    rows: Snapshot = {"ugate_process_cpu_seconds": [[times.user + times.system]],
                      "ugate_process_start_time_seconds": [[_START]]}
    try:
        with open("/proc/self/statm") as f:
            rows["ugate_process_resident_memory_bytes"] = [[int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")]]
        rows["ugate_process_open_fds"] = [[len(os.listdir("/proc/self/fd"))]]
    except OSError:  # no /proc (a container without it): those two are left out
        pass
    return rows


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Several processes' snapshots as one: rows with the same labels combine by their metric's ``agg``."""
    combined: dict[str, dict[tuple[Any, ...], float]] = {}
    for snap in snapshots:
        for name, rows in snap.items():
            spec = METRICS.get(name)
            if spec is None:  # a sibling of another version: what we cannot describe is left out
                continue
            into = combined.setdefault(name, {})
            for row in rows:
                key, value = tuple(row[:-1]), row[-1]
                if key not in into:
                    into[key] = value
                elif spec.agg == "min":
                    into[key] = min(into[key], value)
                elif spec.agg == "max":
                    into[key] = max(into[key], value)
                else:
                    into[key] += value
    return {name: [[*key, value] for key, value in rows.items()] for name, rows in combined.items()}


def render(snapshot: Snapshot) -> tuple[bytes, str]:
    """The Prometheus text exposition of a (merged) snapshot, and its content type."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
        Metric,
    )

    class _Collector:
        def collect(self) -> Iterator[Metric]:
            for name, spec in METRICS.items():
                rows = snapshot.get(name, [])
                family: Metric
                if spec.kind == "info":
                    info = InfoMetricFamily(name, spec.help, labels=spec.labels)
                    for row in rows:
                        info.add_metric([], dict(zip(spec.labels, map(str, row[:-1]), strict=True)))
                    yield info
                    continue
                if spec.kind == "counter":
                    family = CounterMetricFamily(name, spec.help, labels=spec.labels)
                else:
                    family = GaugeMetricFamily(name, spec.help, labels=spec.labels)
                for row in sorted(rows, key=lambda r: [str(v) for v in r[:-1]]):
                    family.add_metric([str(v) for v in row[:-1]], float(row[-1]))
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4  # the text format it writes
