"""Errors with meanings: who broke what, and the answer each one earns on the wire.

Each listener kind maps these to its protocol's reply (SOCKS reply code, HTTP status, TCP RST); each
also says how the flow's access-log record reads (``close``). Programming errors stay builtin exceptions.
"""

from __future__ import annotations

from typing import ClassVar

from gate.flow import Close

__all__ = [
    "ClientProtocolError",
    "ConfigError",
    "GateError",
    "HandshakeTimeout",
    "RefusedByPolicy",
    "RejectedByRule",
    "UpstreamError",
    "UpstreamRefused",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]


class GateError(Exception):
    """Base of the errors that end one flow (never the gateway)."""

    close: ClassVar[Close] = Close.CLIENT_ERROR


class ClientProtocolError(GateError):
    """The client sent bytes that break its protocol (bad handshake, bad request head)."""


class HandshakeTimeout(ClientProtocolError):
    """The client did not finish its handshake (or request head) in time."""

    close = Close.HANDSHAKE_TIMEOUT


class RejectedByRule(GateError):
    """A route with ``action: reject`` (or a peer's allow list) refused the flow."""

    close = Close.REJECTED


class RefusedByPolicy(GateError):
    """A check that holds for every flow, whatever the routes say, refused it: the destination is this
    gate itself (a loop), or a route's kind of upstream does not exist for this flow."""

    close = Close.REFUSED


class UpstreamError(GateError):
    """The upstream could not be reached; subclasses say how."""

    close = Close.UPSTREAM_ERROR
    kind: ClassVar[str] = "other"  # the metrics' dial error kind (ugate_dial_errors_total)


class UpstreamRefused(UpstreamError):
    """The upstream host answered with RST (ECONNREFUSED)."""

    kind = "refused"


class UpstreamUnreachable(UpstreamError):
    """No route, name did not resolve, or the network said unreachable."""

    kind = "unreachable"


class UpstreamTimeout(UpstreamError):
    """The connect did not complete within the connect timeout."""

    kind = "timeout"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every located problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
