"""Moving bytes between two endpoints, zero-copy (splice) where the kernel allows it."""

from splice.relay import PIPE_POOL, Deadlines, PipePool, Relay, can_splice

__all__ = ["PIPE_POOL", "Deadlines", "PipePool", "Relay", "can_splice"]
