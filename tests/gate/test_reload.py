"""Hot reload: the listener plan (pure), and a real gate re-reading its file on SIGHUP: unchanged
listeners keep their open flows, changed ones keep their socket, added ones serve, removed ones stop,
new routes take effect, and a bad config is refused with the old one still serving."""

from __future__ import annotations

import signal
import socket
import time
from typing import Any

import pytest
import yaml

from gate.config import parse_config
from gate.reload import plan_listeners, restart_needed
from tests.conftest import free_port


def _listeners(*specs: dict[str, Any]) -> Any:
    return parse_config({"listeners": list(specs)}).listeners


FWD = {"name": "f", "kind": "forward", "listen": "127.0.0.1:7001", "to": "127.0.0.1:9"}
SOCKS = {"name": "s", "kind": "socks5", "listen": "127.0.0.1:7002"}
UDP = {"name": "u", "kind": "tproxy_udp", "listen": "0.0.0.0:7003"}
TP = {"name": "t", "kind": "tproxy", "listen": "0.0.0.0:7004"}


def test_plan_keeps_what_did_not_change() -> None:
    plan = plan_listeners(_listeners(FWD, SOCKS), _listeners(FWD, SOCKS))
    assert plan.keep == ("f", "s") and not plan.changed


def test_plan_hands_the_socket_of_a_changed_listener_to_its_successor() -> None:
    plan = plan_listeners(_listeners(FWD, SOCKS), _listeners({**FWD, "max_flows": 10}, SOCKS))
    assert plan.keep == ("s",) and plan.start == ("f",) and plan.retire == ("f",)
    assert plan.handover == (("f", "f"),) and plan.stop_first == ()


def test_plan_renamed_listener_on_the_same_address_takes_the_socket() -> None:
    plan = plan_listeners(_listeners(FWD), _listeners({**SOCKS, "listen": FWD["listen"]}))
    assert plan.start == ("s",) and plan.retire == ("f",) and plan.handover == (("s", "f"),)


def test_plan_new_address_binds_first_and_removed_listener_retires() -> None:
    plan = plan_listeners(_listeners(FWD, SOCKS), _listeners({**FWD, "listen": "127.0.0.1:7005"}))
    assert plan.start == ("f",) and set(plan.retire) == {"f", "s"} and plan.handover == () and plan.stop_first == ()


def test_plan_udp_and_transparency_changes_free_the_port_first() -> None:
    plan = plan_listeners(_listeners(UDP, TP), _listeners({**UDP, "session_timeout": 5},
                                                          {**TP, "kind": "forward", "to": "127.0.0.1:9"}))
    assert set(plan.stop_first) == {"u", "t"} and plan.handover == ()


def test_plan_rebuilds_on_request() -> None:
    plan = plan_listeners(_listeners(FWD), _listeners(FWD), rebuild=frozenset({"f"}))
    assert plan.start == plan.retire == ("f",) and plan.handover == (("f", "f"),)


def test_restart_needed_for_workers_and_added_capture() -> None:
    old = parse_config({"listeners": [FWD]})
    assert restart_needed(old, parse_config({"listeners": [FWD]})) == []
    problems = restart_needed(old, parse_config({"listeners": [FWD], "workers": 2}))
    assert [p.split(":")[0] for p in problems] == ["config.workers"]
    captured = parse_config({"listeners": [TP], "capture": {"mode": "tproxy", "role": "router", "apply": "auto"}})
    assert [p.split(":")[0] for p in restart_needed(old, captured)] == ["capture.apply"]


# -- a real gate ----------------------------------------------------------------------------------


def _rewrite(gate: Any, **changes: Any) -> None:
    config = {**gate.config, **changes}
    gate.config = config
    path = gate.stderr_path.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))


def _reload(gate: Any) -> str:
    """SIGHUP, then the outcome's log line."""
    before = gate.stderr().count("reload")
    gate.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in gate.stderr().splitlines() if "reloaded:" in line or "reload refused" in line]
        if len(lines) > 0 and gate.stderr().count("reload") > before:
            return lines[-1]
        assert gate.alive() and time.monotonic() < deadline, gate.stderr()
        time.sleep(0.02)


def _get(port: int, path: bytes = b"/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET " + path + b" HTTP/1.0\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    return answer


def _socks_get(port: int, target: int, path: bytes = b"/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big"))
        reply = s.recv(10)
        if reply[1] != 0:
            return reply
        s.sendall(b"GET " + path + b" HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    return answer


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sighup_reloads_without_dropping_flows(start_gate: Any, http_origin: int, http_origin2: int,
                                               hash_echo: int) -> None:
    keep, change, gone, added, socks = (free_port() for _ in range(5))
    listeners = [
        {"name": "keep", "kind": "forward", "listen": f"127.0.0.1:{keep}", "to": f"127.0.0.1:{hash_echo}"},
        {"name": "change", "kind": "forward", "listen": f"127.0.0.1:{change}", "to": f"127.0.0.1:{http_origin}"},
        {"name": "gone", "kind": "forward", "listen": f"127.0.0.1:{gone}", "to": f"127.0.0.1:{http_origin}"},
        {"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{socks}"},
    ]
    routes = [{"name": "no-origin2", "match": {"port": http_origin2}, "action": "reject"},
              {"name": "rest", "action": "direct"}]
    gate = start_gate(listeners, routes)
    assert _socks_get(socks, http_origin2)[1] == 2  # rejected: "connection not allowed by ruleset"
    open_flow = socket.create_connection(("127.0.0.1", keep), timeout=5)
    open_flow.sendall(b"a" * 1000)
    pid = gate.proc.pid
    new_listeners = [listeners[0], {**listeners[1], "to": f"127.0.0.1:{http_origin2}"}, listeners[3],
                     {"name": "added", "kind": "forward", "listen": f"127.0.0.1:{added}",
                      "to": f"127.0.0.1:{http_origin}"}]
    _rewrite(gate, listeners=new_listeners, routes=[{"name": "rest", "action": "direct"}])
    line = _reload(gate)
    assert "reloaded: 4 listeners (2 kept, 2 started, 2 retired), 1 routes" in line
    assert _socks_get(socks, http_origin2, b"/now").endswith(b"/now\n")  # the new routes
    assert _get(change, b"/c").endswith(b"hello from %d /c\n" % http_origin2)  # the changed listener
    assert _get(added, b"/a").endswith(b"hello from %d /a\n" % http_origin)
    assert not _listening(gone)
    open_flow.sendall(b"b" * 500)  # the flow opened before the reload goes on
    open_flow.shutdown(socket.SHUT_WR)
    assert open_flow.recv(100).endswith(b" 1500")
    open_flow.close()

    # a bad config is refused, located; everything goes on as it was
    good = dict(gate.config)
    _rewrite(gate, listeners=[*new_listeners, {"name": "bad", "kind": "forward", "listen": "127.0.0.1:0"}],
             routes=[{"name": "x", "match": {"listener": "nope"}, "action": "direct"}])
    line = _reload(gate)
    assert "reload refused" in line
    assert "listeners[4]" in gate.stderr() and "routes[0]" in gate.stderr()
    assert _get(added, b"/still").endswith(b"/still\n") and _get(change, b"/c").endswith(b"%d /c\n" % http_origin2)
    # an address in use refuses the reload before anything changed
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        moved = {**new_listeners[3], "listen": f"127.0.0.1:{busy}"}
        _rewrite(gate, **{**good, "listeners": [*new_listeners[:3], moved]})
        assert "reload refused" in _reload(gate)
    assert _get(added, b"/kept").endswith(b"/kept\n")
    assert gate.alive() and gate.proc.pid == pid
    assert gate.stop() == 0


def test_changed_listener_keeps_its_queued_connections(start_gate: Any, http_origin: int) -> None:
    """The rebuilt listener takes over the very socket: a connection queued in the backlog while the
    reload runs is served, not reset."""
    port = free_port()
    listener = {"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{http_origin}"}
    gate = start_gate([listener])
    for i in range(5):
        _rewrite(gate, listeners=[{**listener, "max_flows": 100 + i}])
        gate.proc.send_signal(signal.SIGHUP)
        for _ in range(20):
            assert _get(port, b"/q").endswith(b"/q\n")
    deadline = time.monotonic() + 10
    while gate.stderr().count("reloaded:") < 5:
        assert time.monotonic() < deadline, gate.stderr()
        time.sleep(0.05)
    assert gate.stop() == 0


@pytest.mark.parametrize("workers", [2])
def test_workers_reload_in_place(start_gate: Any, http_origin: int, http_origin2: int, workers: int) -> None:
    port = free_port()
    listener = {"name": "f", "kind": "forward", "listen": f"127.0.0.1:{port}", "to": f"127.0.0.1:{http_origin}"}
    gate = start_gate([listener], workers=workers)
    deadline = time.monotonic() + 10
    while gate.stderr().count("ugate ready") < workers:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _rewrite(gate, listeners=[{**listener, "to": f"127.0.0.1:{http_origin2}"}])
    gate.proc.send_signal(signal.SIGHUP)
    while gate.stderr().count("reloaded:") < workers:
        assert time.monotonic() < deadline + 10, gate.stderr()
        time.sleep(0.05)
    for _ in range(20):  # SO_REUSEPORT spreads these over both workers
        assert _get(port, b"/w").endswith(b"hello from %d /w\n" % http_origin2)
    _rewrite(gate, workers=3)
    gate.proc.send_signal(signal.SIGHUP)
    while "reload refused" not in gate.stderr():
        assert time.monotonic() < deadline + 20, gate.stderr()
        time.sleep(0.05)
    assert "config.workers: 2 -> 3 needs a restart" in gate.stderr()
    assert gate.stderr().count("reloaded:") == workers  # the workers were not signalled
    assert gate.stop() == 0
