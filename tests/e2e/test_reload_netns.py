"""Reload and capture in network namespaces the tests create (and always remove): capture rules replaced
in one nftables transaction, a gate reloaded 20 times under load (iperf3 and 50 curl loops through SOCKS,
forward and tproxy listeners) without a failed transfer, and capture run by an unprivileged user holding
only CAP_NET_ADMIN, CAP_NET_RAW and CAP_NET_BIND_SERVICE (what configs/systemd/ugate.service grants)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import netns
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
PREFIX = f"ugrl{os.getpid() % 10000}"
WEB, WEB2, IPERF = 8080, 8081, 5201
GW = "10.77.1.1"  # the gateway's LAN address: the SOCKS and forward listeners
SERVER = "10.77.2.2"


def spawn(topo: netns.Topology, role: str, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(topo.cmd(role, *argv), cwd=ROOT, **kw)


def wait_listening(topo: netns.Topology, role: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while f":{port} " not in topo.run(role, "ss", "-Hltn"):
        assert time.monotonic() < deadline, f"nothing listens on {port} in {role}"
        time.sleep(0.05)


def wait_for(predicate: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# peer_server with a backlog for 50 clients at once (socketserver's default of 5 drops SYNs under this
# load, and the retransmitted ones then miss the gate's connect timeout)
WEB_SERVER = ("import sys\nfrom tests.e2e.peer_server import DualStack, Handler\n"
              "DualStack.request_queue_size = 4096\nDualStack(('::', int(sys.argv[1])), Handler).serve_forever()\n")


@pytest.fixture(scope="module")
def router() -> Iterator[netns.Topology]:
    netns.remove(PREFIX)
    topo = netns.router(PREFIX)
    servers = [spawn(topo, "server", sys.executable, "-c", WEB_SERVER, str(port)) for port in (WEB, WEB2)]
    servers.append(spawn(topo, "server", "iperf3", "-s", "-p", str(IPERF)))
    try:
        for port in (WEB, WEB2, IPERF):
            wait_listening(topo, "server", port)
        yield topo
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()
        topo.remove()


def curl(topo: netns.Topology, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(topo.cmd("client", "curl", "-sS", "--max-time", "10", *args, url), capture_output=True,
                          text=True)


TPROXY = [{"name": "tproxy4", "kind": "tproxy", "listen": "0.0.0.0:15001"},
          {"name": "tproxy6", "kind": "tproxy", "listen": "[::]:15006"}]
CAPTURE = {"mode": "tproxy", "role": "router", "interfaces": ["lan0"], "ports": [WEB], "apply": "auto"}


def nft_ruleset(topo: netns.Topology) -> str:
    return topo.run("gateway", "nft", "list", "ruleset")


@pytest.mark.parametrize("on_failure", ["closed", "open"])
def test_capture_rules_replaced_in_one_transaction(start_gate: Any, router: netns.Topology, on_failure: str) -> None:
    """``open``: the table is owned by the gate's netlink socket (it dies with the gate); the replacement is
    sent through that socket, and the new table is owned by it too."""
    capture = {**CAPTURE, "on_failure": on_failure}
    gate = start_gate(TPROXY, netns=router.ns["gateway"], capture=capture)
    assert curl(router, f"http://{SERVER}:{WEB}/").stdout == "you are 10.77.2.1\n"  # captured: from the gate
    before = nft_ruleset(router)
    assert "10.77.2.2" not in before
    monitor_out = Path(gate.stderr_path.with_suffix(".nft"))
    monitor = spawn(router, "gateway", "nft", "monitor", stdout=monitor_out.open("wb"))
    try:
        # a marker change of our own shows the monitor is listening before the reload starts
        wait_for(lambda: (router.run("gateway", "nft", "add table inet ugrl_marker; delete table inet ugrl_marker")
                          or True) and "ugrl_marker" in monitor_out.read_text(), "nft monitor never started", 10)
        start = len(monitor_out.read_text())
        gate.config["capture"] = {**capture, "exclude": [f"{SERVER}/32"]}  # the server is no longer captured
        gate.stderr_path.with_suffix(".yaml").write_text(yaml.safe_dump(gate.config))
        gate.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded:" in gate.stderr(), gate.stderr()[-2000:])
        wait_for(lambda: "# new generation" in monitor_out.read_text()[start:], "no nft transaction", 5)
        time.sleep(0.5)  # (a second transaction, if the reload made one, would show up meanwhile)
        events = monitor_out.read_text()[start:]
    finally:
        monitor.terminate()
        monitor.wait()
    generations = re.findall(r"# new generation \d+ by process \d+ \((\S+)\)", events)
    assert len(generations) == 1, events  # the delete and the new table in one transaction
    assert "delete table inet ugate" in events and "add table inet ugate" in events
    after = nft_ruleset(router)
    assert "10.77.2.2" in after and after.replace("ip daddr 10.77.2.2 return", "") != before
    # the new rules are in force: the server is reached directly (routed, not proxied) ...
    assert curl(router, f"http://{SERVER}:{WEB}/").stdout == "you are 10.77.1.2\n"
    # ... while IPv6 is still captured
    assert curl(router, f"http://[fd77:2::2]:{WEB}/").stdout == "you are fd77:2::1\n"
    if on_failure == "open":
        assert "flags owner" in after
        gate.proc.kill()  # kill -9: the kernel deletes the table its socket owned
        gate.proc.wait()
        wait_for(lambda: "ugate" not in nft_ruleset(router), "the owned table outlived its gate", 5)
        router.run("gateway", sys.executable, "-m", "gate", "--config", str(gate.stderr_path.with_suffix(".yaml")),
                   "rules", "clear")  # the policy routing it leaves is inert, but the test leaves nothing
        return
    assert gate.stop() == 0
    assert "ugate" not in nft_ruleset(router)  # cleared at exit, with the replaced table's own spec


def _load_config(extra: str, toggle: str) -> dict[str, Any]:
    """The reload test's configs: the same SOCKS, forward and tproxy listeners every time, plus one
    listener that comes and goes; the SOCKS route to the second web port flips between direct and reject."""
    listeners = [
        {"name": "socks", "kind": "socks5", "listen": f"{GW}:1080"},
        {"name": "web", "kind": "forward", "listen": f"{GW}:8081", "to": f"{SERVER}:{WEB}"},
        {"name": "iperf", "kind": "forward", "listen": f"{GW}:{IPERF}", "to": f"{SERVER}:{IPERF}"},
        *TPROXY,
        {"name": extra, "kind": "forward", "listen": f"{GW}:{9001 if extra == 'extra-a' else 9002}",
         "to": f"{SERVER}:{WEB}"},
    ]
    routes = [{"name": "toggle", "match": {"listener": "socks", "port": WEB2}, "action": toggle},
              {"name": "rest", "action": "direct"}]
    return {"listeners": listeners, "routes": routes}


# One client's loop: fetch, check the body, record ok or the failure; until the stop file appears.
LOOP = """
stop=$1; out=$2; shift 2
while [ ! -e "$stop" ]; do
  body=$(curl -sS --max-time 20 "$@" 2>&1)
  if [ "$body" = "you are 10.77.2.1" ]; then echo ok; else echo "FAIL $body"; fi
done > "$out"
"""

# iperf3 sessions of 3 s, one after the other, through the forward listener, each one's JSON kept, until stopped.
IPERF_LOOP = f"""
stop=$1; dir=$2; i=0
while [ ! -e "$stop" ]; do
  i=$((i+1))
  if iperf3 -c {GW} -p {IPERF} -t 3 -J > "$dir/iperf.$i.json"; then echo ok; else echo "FAIL $?"; fi
  sleep 1  # the server takes a moment to end a test; sooner, it answers "busy running a test"
done > "$dir/iperf.results"
"""

# Probes the SOCKS route to WEB2 in a tight loop: "<CLOCK_MONOTONIC> allowed|rejected" per attempt.
PROBE = """
import socket, sys, time
stop = sys.argv[1]
import os
while not os.path.exists(stop):
    s = socket.create_connection(("10.77.1.1", 1080), timeout=10)
    s.sendall(b"\\x05\\x01\\x00")
    s.recv(2)
    s.sendall(b"\\x05\\x01\\x00\\x01" + socket.inet_aton("10.77.2.2") + (8081).to_bytes(2, "big"))
    reply = s.recv(10)
    s.close()
    print(time.monotonic(), "allowed" if reply[1] == 0 else "rejected", flush=True)
    time.sleep(0.01)
"""


@pytest.mark.timeout(600)
def test_reload_under_load(start_gate: Any, router: netns.Topology, tmp_path: Path) -> None:
    config = _load_config("extra-a", "reject")
    gate = start_gate(config["listeners"], config["routes"], netns=router.ns["gateway"], capture=CAPTURE,
                      log={"level": "info", "access": "off"})
    # The 50 client loops (a curl process per request) and the other suites sharing this machine's two
    # cores would starve the gate, which in a deployment has its core while its clients live elsewhere:
    # it gets the scheduler's preference here, as `Nice=` in a unit would give it.
    os.setpriority(os.PRIO_PROCESS, gate.proc.pid, -10)
    stop = tmp_path / "stop"
    kinds = {"socks": ["--socks5", f"{GW}:1080", f"http://{SERVER}:{WEB}/"], "forward": [f"http://{GW}:8081/"],
             "tproxy": [f"http://{SERVER}:{WEB}/"]}
    loops: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
    probe_out = tmp_path / "probe"
    probe = spawn(router, "client", sys.executable, "-c", PROBE, str(stop), stdout=probe_out.open("wb"))
    iperf = spawn(router, "client", "sh", "-c", IPERF_LOOP, "iperf", str(stop), str(tmp_path))
    try:
        clients = [(kind, args) for kind, args in kinds.items() for _ in range(10 if kind == "tproxy" else 20)]
        for i, (kind, args) in enumerate(clients):
            out = tmp_path / f"loop{i}.{kind}"
            loops.append((kind, out, spawn(router, "client", "sh", "-c", LOOP, "loop", str(stop), str(out), *args)))

        def probe_states() -> list[tuple[float, str]]:
            return [(float(t), state) for t, state in (line.split() for line in probe_out.read_text().splitlines()
                                                        if line.count(" ") == 1)]

        wait_for(lambda: probe_states() and all(out.exists() and "ok" in out.read_text() for _, out, _ in loops),
                 "the loops did not start", 60)
        effective: list[float] = []  # SIGHUP -> the gate logged the swap
        seen: list[float] = []  # SIGHUP -> a probe through the (busy) gate got the new decision back
        for n in range(1, 21):
            extra, toggle = ("extra-b", "direct") if n % 2 else ("extra-a", "reject")
            new = _load_config(extra, toggle)
            if n == 10:  # refused: a route names a listener that does not exist; n = 9's config stays
                new["routes"].insert(0, {"name": "typo", "match": {"listener": "sock"}, "action": "direct"})
                sent, _ = _reload(gate, new)
                assert "reload refused" in gate.stderr() and "routes[0].match.listener" in gate.stderr()
                wait_for(lambda: sum(t > sent for t, _ in probe_states()) >= 3, "the probe stalled", 10)  # noqa: B023
                assert {state for t, state in probe_states() if t > sent} == {"allowed"}
                continue
            sent, sent_wall = _reload(gate, new)
            # in force for every flow routed after the "reloaded" line (logged once the router is swapped)
            done = _logged_at(next(line for line in reversed(gate.stderr().splitlines()) if "reloaded:" in line))
            effective.append(done - sent_wall)
            want = "allowed" if toggle == "direct" else "rejected"
            wait_for(lambda: _first(probe_states(), sent, want) is not None,  # noqa: B023 (called at once)
                     f"route {want} never seen", 10)
            seen.append(_first(probe_states(), sent, want) - sent)  # type: ignore[operator]
            here, gone = (9002, 9001) if n % 2 else (9001, 9002)
            assert curl(router, f"http://{GW}:{here}/").stdout == "you are 10.77.2.1\n"
            assert curl(router, f"http://{GW}:{gone}/").returncode == 7  # refused: that listener was removed
        assert gate.stderr().count("reloaded:") == 19 and gate.stderr().count("reload refused") == 1
        gate_ms = re.findall(r"reloaded: .* in (\d+) ms", gate.stderr())
        print(f"reload: effective after {sorted(round(x, 3) for x in effective)} s, seen by a probe after "
              f"{sorted(round(x, 3) for x in seen)} s, gate-side {gate_ms} ms")
        assert max(effective) < 1.0, effective  # new routes are in force within a second of SIGHUP
        assert max(seen) < 5.0, seen  # (a generous bound: the probe queues behind 50 busy clients)
    finally:
        stop.touch()
        for _, _, proc in loops:
            proc.wait(60)
        probe.wait(30)
        iperf.wait(60)
    sessions = (tmp_path / "iperf.results").read_text().splitlines()
    assert len(sessions) >= 3 and set(sessions) == {"ok"}, sessions
    reports = [json.loads(path.read_text()) for path in tmp_path.glob("iperf.*.json")]
    assert [report["error"] for report in reports if "error" in report] == []
    assert all(report["end"]["sum_received"]["bytes"] > 1_000_000 for report in reports)
    results: dict[str, list[str]] = {kind: [] for kind in kinds}
    for kind, out, proc in loops:
        assert proc.returncode == 0
        results[kind] += out.read_text().splitlines()
    for kind, lines in results.items():
        failed = [line for line in lines if line != "ok"]
        assert failed == [] and len(lines) >= 40, (kind, len(lines), failed[:5])
    assert gate.stop() == 0


def _reload(gate: Any, config: dict[str, Any]) -> tuple[float, float]:
    """Write ``config``, SIGHUP, wait for the outcome's log line; when the signal went (monotonic, wall)."""
    gate.config.update(config)
    gate.stderr_path.with_suffix(".yaml").write_text(yaml.safe_dump(gate.config))

    def outcomes() -> int:
        return gate.stderr().count("reloaded:") + gate.stderr().count("reload refused")

    before = outcomes()
    sent = time.monotonic(), time.time()
    gate.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: outcomes() > before, gate.stderr()[-3000:], 30)
    return sent


def _first(states: list[tuple[float, str]], after: float, want: str) -> float | None:
    return next((t for t, state in states if t > after and state == want), None)


def _logged_at(line: str) -> float:
    """The time of a log line (logging's default asctime: local time, milliseconds after a comma)."""
    stamp, millis = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def _all_caps_but(*keep: str) -> str:
    """Every capability name of this kernel except ``keep``, as capsh --drop wants them."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    decoded = subprocess.run(["capsh", f"--decode={(1 << (last + 1)) - 1:#x}"], capture_output=True, text=True,
                             check=True).stdout
    names = decoded.strip().split("=", 1)[1].split(",")
    return ",".join(name for name in names if name not in keep)


@pytest.mark.skipif(shutil.which("capsh") is None, reason="capsh missing (Debian: libcap2-bin)")
def test_capture_as_unprivileged_user_with_three_capabilities(router: netns.Topology, tmp_path: Path) -> None:
    """As ugate.service runs it: user nobody, only CAP_NET_ADMIN, CAP_NET_RAW, CAP_NET_BIND_SERVICE
    (ambient, so nft and the gate's own netlink calls have them; the bounding set holds nothing else).

    Python lives under /root (mode 0700) here: a private mount namespace puts a world-readable tmpfs on
    /root with only the interpreter's tree bound in, so user nobody can run it (nothing changes outside)."""
    keep = ("cap_net_admin", "cap_net_raw", "cap_net_bind_service")
    public = Path(tempfile.mkdtemp(prefix="ugrl-"))  # readable by nobody, unlike tmp_path
    try:
        public.chmod(0o755)
        config = public / "gate.yaml"
        config.write_text(yaml.safe_dump({"log": {"level": "info", "access": "stderr"},
                                          "listeners": TPROXY, "capture": CAPTURE, "routes": [{"action": "direct"}]}))
        config.chmod(0o644)
        python = Path(sys.executable).resolve()
        pyroot = next((p for p in python.parents if p.name == ".pyenv"), None)
        mounts = ""
        if pyroot is not None and pyroot.parent == Path("/root"):
            hold = public / "py"
            hold.mkdir()
            mounts = (f"mount --bind {pyroot} {hold} && mount -t tmpfs -o mode=755 tmpfs /root && "
                      f"mkdir {pyroot} && mount --move {hold} {pyroot} && ")
        caps = ",".join(keep)
        inner = f"grep -E 'Cap(Eff|Bnd|Amb)' /proc/self/status >&2; id -u >&2; exec {python} -m gate --config {config}"
        shell = (f"{mounts}exec capsh --drop={_all_caps_but(*keep)} "
                 f"--caps='{caps}+eip cap_setpcap,cap_setuid,cap_setgid+ep' --keep=1 --user=nobody "
                 f"--addamb={caps} -- -c \"{inner}\"")
        err = tmp_path / "stderr"
        gate = spawn(router, "gateway", "unshare", "-m", "sh", "-c", shell, stderr=err.open("wb"))
        try:
            wait_for(lambda: "ugate ready" in err.read_text() or gate.poll() is not None, "no start", 20)
            text = err.read_text()
            assert "ugate ready" in text and "capture rules applied" in text, text
            status = dict(line.split(":\t") for line in text.splitlines() if line.startswith("Cap"))
            three = f"{(1 << 10) | (1 << 12) | (1 << 13):016x}"  # NET_BIND_SERVICE, NET_ADMIN, NET_RAW
            assert status == {"CapEff": three, "CapBnd": three, "CapAmb": three}, status
            assert "\n65534\n" in text
            got = curl(router, f"http://{SERVER}:{WEB}/")
            assert got.stdout == "you are 10.77.2.1\n", got.stderr + err.read_text()[-2000:]  # captured and proxied
            wait_for(lambda: '"listener":"tproxy4"' in err.read_text(), "no access record", 5)
            gate.send_signal(signal.SIGTERM)
            assert gate.wait(15) == 0, err.read_text()[-2000:]
            assert "capture rules cleared" in err.read_text()
            assert "ugate" not in nft_ruleset(router)
        finally:
            if gate.poll() is None:
                gate.kill()
                gate.wait()
    finally:
        shutil.rmtree(public, ignore_errors=True)
