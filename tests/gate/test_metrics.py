"""The metrics: counted once per ended flow, summed over workers, written in the exposition format."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.context import Context
from gate.flow import Close, Flow, FlowState
from gate.metrics import METRICS, Metrics, merge, render
from gate.router import Router
from gate.vocab import Action


def _flow(listener: str = "socks", rule: str = "out", up: int = 10, down: int = 20, close: Close = Close.EOF) -> Flow:
    flow = Flow(listener, Endpoint("192.0.2.9", 40000))
    flow.rule, flow.action, flow.bytes_up, flow.bytes_down = rule, Action.DIRECT, up, down
    flow.closing(close)
    return flow


def test_finish_counts_each_flow_once_with_bounded_labels() -> None:
    ctx = Context(router=Router(()), access_log=AccessLog("off"))
    flows = [ctx.begin(_flow()) for _ in range(3)]
    live = ctx.begin(Flow("socks", Endpoint("192.0.2.10", 1)))
    live.state = FlowState.HANDSHAKE
    for flow in flows:
        ctx.finish(flow)
        ctx.finish(flow)  # a second finish is a no-op, for the log and the metrics alike
    snap = ctx.metrics.snapshot(ctx.live.values(), {"tls": 2, "timeout": 1})
    assert snap["ugate_flows"] == [["socks", "out", "direct", "eof", 3]]
    assert sorted(snap["ugate_flow_bytes"]) == [["socks", "out", "down", 60], ["socks", "out", "up", 30]]
    assert snap["ugate_flows_active"] == [["socks", "handshake", 1]]
    assert ["sniff", 1] in snap["ugate_timeouts"] and ["tls", 2] in snap["ugate_sniff_outcomes"]
    # no client address is ever a label value
    assert "192.0.2" not in repr(snap)


def test_handshake_timeouts_and_udp_sessions() -> None:
    metrics = Metrics()
    metrics.finished(_flow(close=Close.HANDSHAKE_TIMEOUT))
    udp = _flow("dns")
    udp.path = "udp"
    metrics.finished(udp)
    snap = metrics.snapshot([], {})
    assert ["handshake", 1] in snap["ugate_timeouts"] and snap["ugate_udp_sessions"] == [["dns", 1]]


def test_merge_sums_workers_and_keeps_the_oldest_start() -> None:
    a, b = Metrics("1"), Metrics("1")
    a.finished(_flow())
    b.finished(_flow())
    b.finished(_flow("http", "web"))
    one, two = a.snapshot([], {"tls": 1}), b.snapshot([], {"tls": 2})
    two["ugate_process_start_time_seconds"] = [[one["ugate_process_start_time_seconds"][0][0] + 100]]
    merged = merge([one, two])
    assert sorted(merged["ugate_flows"]) == [["http", "web", "direct", "eof", 1], ["socks", "out", "direct", "eof", 2]]
    assert merged["ugate_workers"] == [[2]] and merged["ugate_sniff_outcomes"] == [["tls", 3]]
    assert merged["ugate_process_start_time_seconds"] == one["ugate_process_start_time_seconds"]
    assert merged["ugate_build"] == [["1", 1]]
    assert "unknown_metric" not in merge([{"unknown_metric": [[1]]}])  # a sibling of another version


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (Debian package prometheus)")
def test_render_passes_promtool_with_awkward_label_values() -> None:
    metrics = Metrics('v"1')
    metrics.finished(_flow('quo"te\\back\nslash', "ünïcode route"))
    body, content_type = render(metrics.snapshot([], {}, [("peer-a", True, {"h2": 3})]))
    assert content_type.startswith("text/plain; version=0.0.4")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    text = body.decode()
    assert 'ugate_mesh_streams{peer="peer-a",transport="h2"} 3.0' in text
    for name, spec in METRICS.items():  # every family is described, even with no samples yet
        suffix = {"counter": "_total", "info": "_info"}.get(spec.kind, "")
        assert f"# HELP {name}{suffix} " in text, name
