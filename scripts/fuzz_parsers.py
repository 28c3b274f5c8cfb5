#!/usr/bin/env python3
"""Volume fuzzing of every parser (tests/fuzz_targets.py) under atheris (libFuzzer, coverage-guided).

    scripts/fuzz_parsers.py                     every target, 1,000,000 inputs each (scripts/fuzz --long)
    scripts/fuzz_parsers.py --runs 20000 tls    some targets, fewer inputs

Each target runs in its own process (libFuzzer runs one per process), seeded with the fixtures captured
from real clients; the corpus it grows and any failing input are kept under --workdir. Exit status 1
if any target failed (the failing input is named), 2 if atheris is missing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_one(name: str, runs: int, workdir: Path) -> None:
    """In the child: fuzz target ``name`` (libFuzzer exits the process with its verdict)."""
    import atheris

    with atheris.instrument_imports(include=["sniff", "gate.proto"]):
        from tests.fuzz_targets import TARGETS
    target = TARGETS[name]
    corpus = workdir / name / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(target.seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    args = [sys.argv[0], f"-runs={runs}", "-max_len=4096", f"-artifact_prefix={workdir / name}/",
            "-print_final_stats=1", str(corpus)]
    atheris.Setup(args, target.check)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="target names (default: all)")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target (default 1,000,000)")
    parser.add_argument("--workdir", type=Path, default=None, help="corpus and crash files (default: a temp dir)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child's target
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ugate-fuzz-"))
    if args.one:
        run_one(args.one, args.runs, workdir)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2
    from tests.fuzz_targets import TARGETS

    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    failed = []
    print(f"{'target':<20} {'inputs':>10} {'seconds':>8} {'per s':>7}  result   (workdir {workdir})", flush=True)
    for name in names:
        started = time.monotonic()
        child = subprocess.run([sys.executable, __file__, "--one", name, "--runs", str(args.runs),
                                "--workdir", str(workdir)], capture_output=True, text=True)
        took = time.monotonic() - started
        log = child.stdout + child.stderr
        (workdir / name / "fuzz.log").write_text(log)
        done = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
        inputs = int(done.group(1)) if done else 0
        ok = child.returncode == 0 and inputs >= args.runs
        crash = re.search(r"Test unit written to (\S+)", log)
        verdict = "ok" if ok else f"FAILED ({crash.group(1) if crash else f'rc {child.returncode}, see fuzz.log'})"
        print(f"{name:<20} {inputs:>10,} {took:>8.0f} {inputs / took:>7,.0f}  {verdict}", flush=True)
        if not ok:
            failed.append(name)
    print(f"{len(names) - len(failed)} of {len(names)} targets passed {args.runs:,} inputs each")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
