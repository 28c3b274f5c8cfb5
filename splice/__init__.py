"""Moving bytes between two endpoints, zero-copy (splice) where the kernel allows it."""

from splice.relay import PIPE_POOL, PipePool, Relay, can_splice
from splice.sweep import Sweeper, sweep_interval

__all__ = ["PIPE_POOL", "PipePool", "Relay", "Sweeper", "can_splice", "sweep_interval"]
