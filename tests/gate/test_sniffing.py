"""The sniff outcome counters: a hit per protocol, a miss, a timeout, an empty flow."""

from __future__ import annotations

from gate.addr import Endpoint
from gate.flow import Flow
from gate.sniffing import SniffOutcomes


def flow(protocol: str | None) -> Flow:
    return Flow(listener="t", client=Endpoint("127.0.0.1", 1), protocol=protocol)


def test_outcomes_are_hits_misses_timeouts_and_empty_flows() -> None:
    outcomes = SniffOutcomes()
    outcomes.record(flow("tls"))
    outcomes.record(flow("tls"))
    outcomes.record(flow("quic"))
    outcomes.record(flow("unknown"))  # bytes that no sniffer recognised
    outcomes.record(flow("unknown"), timed_out=True)  # some bytes, then the wait ran out
    outcomes.record(flow("none"), timed_out=True)  # a server-first protocol
    outcomes.record(flow("none"))  # half-closed before a byte
    assert outcomes == {"tls": 2, "quic": 1, "miss": 1, "timeout": 2, "empty": 1}
