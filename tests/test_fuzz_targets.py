"""The parser fuzz targets (tests/fuzz_targets.py) that scripts/fuzz --long runs at volume: they take
their seeds and every mutation of them the parsers' contract allows, they fail on a parser that breaks
the contract, and the atheris driver runs each of them (a short run here; >= 1M inputs nightly)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from sniff.result import NEED_MORE, NotThisProtocol
from tests.conftest import ROOT
from tests.fuzz_targets import TARGETS, _message, _verdict, datagrams_of


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_has_seeds_and_holds_on_their_truncations_and_flips(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()
    assert seeds, f"{name} starts from nothing"
    for seed in seeds:
        for cut in range(0, len(seed), max(1, len(seed) // 64)):
            target.check(seed[:cut])
            target.check(seed[:cut] + bytes([seed[cut] ^ 0xFF]) + seed[cut + 1:])


@dataclass(frozen=True)
class _Result:
    consumed: int


def test_the_checks_catch_a_parser_that_breaks_its_contract() -> None:
    def crashes(data: bytes) -> object:
        return data[10]  # IndexError on short input: not the parser's own error

    with pytest.raises(IndexError):
        _message(crashes, NotThisProtocol)(b"x")
    with pytest.raises(IndexError):
        _verdict(crashes, NotThisProtocol)(b"x")
    with pytest.raises(AssertionError):  # claims more bytes than it was given
        _message(lambda data: _Result(len(data) + 1), NotThisProtocol)(b"abc")
    with pytest.raises(AssertionError):  # consumed nothing: a caller would loop
        _message(lambda data: _Result(0), NotThisProtocol)(b"abc")
    _message(lambda data: NEED_MORE, NotThisProtocol)(b"abc")


def test_datagrams_of_reads_the_fixture_layout_and_bounds_the_count() -> None:
    assert datagrams_of(b"") == [b""]
    assert datagrams_of(b"\x00\x02ab\x00\x01c") == [b"ab", b"c"]
    assert datagrams_of(b"\x00\x09ab") == [b"ab"]  # a length past the end: what there is
    assert len(datagrams_of(b"\x00\x00" * 10)) == 4  # the rest is the last datagram


def test_the_atheris_driver_runs_every_target() -> None:
    pytest.importorskip("atheris")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_parsers.py"), "--runs", "300"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(TARGETS)} of {len(TARGETS)} targets passed" in done.stdout
