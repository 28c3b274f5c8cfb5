#!/usr/bin/env python3
"""The routing part of scripts/bench: decisions per flow and config load with large rule sets.

Generates (deterministic seed) what home-router users load: 10,000 CIDRs (a country's address blocks,
9,000 IPv4 and 1,000 IPv6) in a ``dst_from`` file and 100,000 names (exact, ``*.suffix`` and ``.suffix``)
in a ``host_from`` file, behind a small route and before a catch-all. Each round runs in a fresh process:
``load_config`` + ``Router`` (seconds, and the RSS they add), then ``Router.decide`` over 10,000 flows
that match one of the lists (half by name, half by address) and 10,000 that match neither (the
catch-all), in microseconds per flow; and for scale, the linear reference (``decide_linear``, what
routing cost before the index) on a few flows. Targets (issue 16): decide <= 5 us/flow, load <= 1 s and
<= 50 MiB. Standalone: ``scripts/bench_routing.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261129
CIDRS4, CIDRS6, NAMES = 9_000, 1_000, 100_000
FLOWS = 10_000  # per kind (match, miss), each decided 3 times
LINEAR_FLOWS = 20  # the linear reference costs milliseconds per flow
TARGET_DECIDE_US, TARGET_LOAD_S, TARGET_LOAD_MIB = 5.0, 1.0, 50.0
TLDS = (".com", ".net", ".org", ".io", ".de", ".ru", ".cn")


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(5, 12)))


def generate(d: Path) -> Path:
    """The list files and the config that reads them, in ``d``; returns the config's path."""
    rng = random.Random(SEED)
    nets = {str(ipaddress.IPv4Network((rng.getrandbits(32), rng.randint(12, 24)), strict=False))
            for _ in range(CIDRS4)}
    nets |= {str(ipaddress.IPv6Network(((0x2 << 124) | rng.getrandbits(124), rng.randint(24, 48)), strict=False))
             for _ in range(CIDRS6)}
    (d / "country.txt").write_text("# generated country blocks (bench_routing)\n\n" + "\n".join(sorted(nets)) + "\n")
    lines = ["# generated block list (bench_routing)", ""]
    for _ in range(NAMES):
        name = _word(rng) + rng.choice(TLDS)
        lines.append(rng.choice(("", "", "*.", ".")) + name + ("  # a comment" if rng.random() < 0.01 else ""))
    (d / "blocked.txt").write_text("\n".join(lines) + "\n")
    config = d / "gate.yaml"
    config.write_text("""listeners: [{name: s, kind: socks5, listen: "127.0.0.1:1080"}]
routes:
  - {name: mail, match: {port: 25}, action: reject}
  - {name: blocked, match: {host_from: blocked.txt}, action: reject}
  - {name: country, match: {dst_from: country.txt}, action: direct}
  - {name: rest, upstream: "127.0.0.1:3128"}
""")
    return config


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(config_path: Path) -> dict[str, float]:
    """One round, in this process (run by ``run`` in a fresh one, so the RSS is this config's alone)."""
    sys.path.insert(0, str(ROOT))
    from gate.config import load_config
    from gate.router import FlowKey, Router, decide_linear

    gc.collect()
    before = _rss_kib()
    start = time.perf_counter()
    config = load_config(config_path)
    router = Router(config.routes)
    load_s = time.perf_counter() - start
    gc.collect()
    load_mib = (_rss_kib() - before) / 1024

    rng = random.Random(SEED + 1)
    blocked, country = config.routes[1].match, config.routes[2].match
    match: list[FlowKey] = []
    for i in range(FLOWS):
        if i % 2:
            pattern = rng.choice(blocked.host)
            name = "www" + pattern[1:] if pattern.startswith("*.") else pattern.lstrip(".")
            match.append(FlowKey("s", "192.168.1.10", name, 443, name))
        else:
            net = rng.choice(country.dst)
            addr = net.network_address + rng.randrange(net.num_addresses)
            match.append(FlowKey("s", "192.168.1.10", str(addr), 443, None))
    miss: list[FlowKey] = []
    while len(miss) < FLOWS:
        if len(miss) % 2:
            name = f"www.{_word(rng)}.example"
            key = FlowKey("s", "192.168.1.10", name, 443, name)
        else:
            key = FlowKey("s", "192.168.1.10", str(ipaddress.IPv4Address(rng.getrandbits(32))), 443, None)
        if router.decide(key).rule == "rest":
            miss.append(key)
    wrong = sum(router.decide(key).rule not in ("blocked", "country") for key in match)
    if wrong:
        raise RuntimeError(f"{wrong} of the matching flows did not match a list")

    def per_flow_us(keys: list[FlowKey], decide: Callable[[FlowKey], object], rounds: int = 3) -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            for key in keys:
                decide(key)
        return (time.perf_counter() - start) / (rounds * len(keys)) * 1e6

    return {"load s": load_s, "load MiB": load_mib, "decide match us": per_flow_us(match, router.decide),
            "decide miss us": per_flow_us(miss, router.decide),
            "linear miss us": per_flow_us(miss[:LINEAR_FLOWS], lambda k: decide_linear(config.routes, k), 1)}


def run(repeat: int, report: Callable[[str], None]) -> dict[str, list[float]]:
    """``repeat`` rounds, each in a fresh process on the same generated set."""
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ugate-routing-") as tmp:
        config = generate(Path(tmp))
        report(f"routing: {CIDRS4 + CIDRS6:,} CIDRs + {NAMES:,} names (seed {SEED}), {repeat} rounds")
        for round_ in range(repeat):
            done = subprocess.run([sys.executable, __file__, "--measure", str(config)], capture_output=True,
                                  text=True, cwd=ROOT)
            if done.returncode != 0:
                report(f"!! routing round {round_ + 1} failed: {done.stderr.strip()[-2000:]}")
                continue
            for key, value in json.loads(done.stdout).items():
                samples.setdefault(key, []).append(value)
    return samples


def _spread(values: list[float], unit: str, digits: int) -> str:
    if not values:
        return "ERR"
    return f"{statistics.median(values):.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(samples: dict[str, list[float]]) -> list[str]:
    lines = [f"{'routing, 10k CIDRs + 100k names':<32} {'median (min-max)':>30}"]
    for key, unit, digits in (("decide match us", "us", 2), ("decide miss us", "us", 2),
                              ("linear miss us", "us", 0), ("load s", "s", 3), ("load MiB", "MiB", 1)):
        lines.append(f"{key:<32} {_spread(samples.get(key, []), unit, digits):>30}")
    return lines


def verdicts(samples: dict[str, list[float]]) -> list[str]:
    """PASS/FAIL lines for the targets (bounds, not ratios), in scripts/bench's format."""
    out = []
    for label, key, bound, unit in (
            (f"routing decide, flows matching a list <= {TARGET_DECIDE_US:g} us", "decide match us",
             TARGET_DECIDE_US, "us"),
            (f"routing decide, flows matching neither <= {TARGET_DECIDE_US:g} us", "decide miss us",
             TARGET_DECIDE_US, "us"),
            (f"routing config load <= {TARGET_LOAD_S:g} s", "load s", TARGET_LOAD_S, "s"),
            (f"routing config load <= {TARGET_LOAD_MIB:g} MiB", "load MiB", TARGET_LOAD_MIB, "MiB")):
        values = samples.get(key)
        if not values:
            out.append(f"  n/a   {label}: not measured")
            continue
        ours = statistics.median(values)
        out.append(f"  {'PASS' if ours <= bound else 'FAIL'}  {label}: {ours:.2f} {unit}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one round, JSON out (run's child)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    samples = run(args.repeat, lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(table(samples)))
    print("targets:")
    print("\n".join(verdicts(samples)))
    return 0 if samples else 1


if __name__ == "__main__":
    sys.exit(main())
