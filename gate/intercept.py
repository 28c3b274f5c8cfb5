"""Interceptors: a route's ``intercept: module:function`` sees a flow's bytes and may change them.

The uproxy seed's OnRead hook, for audits, protocol fix-ups and tests: the function is called with an
``Event`` for the flow's start (``open``), each chunk the relay reads (``up``: from the client, ``down``:
from the upstream) and its end (``close``, with the reason). For a chunk it returns ``None`` to pass it on
unchanged, or the bytes to send instead (``b""`` drops the chunk). Chunks are what one read returned: a
message may span several, and the function keeps its own state per ``event.flow.id`` if it needs whole
messages. An intercepted flow uses the copy relay (its bytes must pass through Python). An exception in
the function resets that flow only (both sides get a reset; the access log says ``intercept error`` and
the exception); the gate and every other flow go on. The function runs on the event loop: it must not
block.

Applies to flows relayed as byte streams (SOCKS, CONNECT, forward, transparent, SNI, mesh); the plain
HTTP proxy (request by request) and UDP do not call it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gate.flow import Flow

__all__ = ["Event", "FlowView", "Interceptor", "load", "transform_for"]


@dataclass(frozen=True, slots=True)
class FlowView:
    """What an interceptor may know of its flow (a snapshot taken when the relay starts)."""

    id: int
    listener: str
    client: str
    dst: str | None
    host: str | None
    sni: str | None
    protocol: str | None
    rule: str | None

    @classmethod
    def of(cls, flow: Flow) -> FlowView:
        return cls(flow.id, flow.listener, str(flow.client), str(flow.dst) if flow.dst else None, flow.host,
                   flow.sni, flow.protocol, flow.rule)


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["open", "up", "down", "close"]
    flow: FlowView
    data: bytes = b""  # the chunk (up, down)
    reason: str | None = None  # why the flow ended (close): the access log's close and detail


Interceptor = Callable[[Event], "bytes | None"]


def load(ref: str) -> Interceptor:
    """The function ``module:function`` names (imported now, so a config that names a missing one is
    refused by ``ugate check``); ValueError says what is wrong."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{ref!r} is not module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name}: {e}") from None
    except Exception as e:  # the module's own code failed: say so, as the config's problem
        raise ValueError(f"importing {module_name} failed: {type(e).__name__}: {e}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"{module_name} has no function {attr!r}")
    return function  # type: ignore[no-any-return]


def transform_for(intercept: Interceptor, flow: Flow) -> Callable[[str, bytes], bytes]:
    """The relay's per-chunk hook: ``(direction, chunk) -> bytes to send``, after the ``open`` event
    (which may raise, as every call may: the runner resets the flow then)."""
    view = FlowView.of(flow)
    intercept(Event("open", view))

    def transform(direction: str, chunk: bytes) -> bytes:
        out = intercept(Event("up" if direction == "up" else "down", view, chunk))
        if out is None:
            return chunk
        if not isinstance(out, bytes | bytearray | memoryview):
            raise TypeError(f"interceptor returned {type(out).__name__}, not bytes or None")
        return bytes(out)

    return transform
