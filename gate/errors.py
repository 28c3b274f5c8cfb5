"""Errors with meanings: who broke what, and the answer each one earns on the wire.

Each listener maps these to its protocol's reply (SOCKS reply code, HTTP status, TCP RST); see
``gate.listeners``. Programming errors stay builtin exceptions.
"""

from __future__ import annotations

__all__ = [
    "ClientProtocolError",
    "ConfigError",
    "GateError",
    "RejectedByRule",
    "UpstreamError",
    "UpstreamRefused",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]


class GateError(Exception):
    """Base of the errors that end one flow (never the gateway)."""


class ClientProtocolError(GateError):
    """The client sent bytes that break its protocol (bad handshake, bad request head)."""


class RejectedByRule(GateError):
    """A route with ``action: reject`` matched the flow."""


class UpstreamError(GateError):
    """The upstream could not be reached; subclasses say how."""


class UpstreamRefused(UpstreamError):
    """The upstream host answered with RST (ECONNREFUSED)."""


class UpstreamUnreachable(UpstreamError):
    """No route, name did not resolve, or the network said unreachable."""


class UpstreamTimeout(UpstreamError):
    """The connect did not complete within the connect timeout."""


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every located problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
