"""Hypothesis budgets for the parser property tests, scaled by UGATE_FUZZ_SCALE (scripts/fuzz --long runs
them 20 times over; the volume, >= 1M inputs per parser, comes from tests/fuzz_targets.py under atheris;
CI runs the budgets as written)."""

from __future__ import annotations

import os

from hypothesis import settings

SCALE = max(1, int(os.environ.get("UGATE_FUZZ_SCALE", "1")))


def budget(examples: int) -> settings:
    """``examples`` inputs (times the scale), no per-input deadline (CI machines are noisy)."""
    return settings(max_examples=examples * SCALE, deadline=None)
