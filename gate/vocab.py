"""The config's words as types: StrEnums, so code that compares with the plain strings keeps working.

``decision.action == "reject"`` and ``"tls" in match.protocol`` hold for the members as for the strings
they replace; mypy now sees which words a field can hold.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args

__all__ = [
    "PROTOCOLS",
    "Action",
    "CaptureApply",
    "CaptureBackend",
    "CaptureMode",
    "CaptureRole",
    "LogAccess",
    "LogLevel",
    "Proto",
    "ProxyProtocol",
    "RelayMode",
    "Transport",
    "UdpMapping",
]


class Action(StrEnum):
    """What a route does with a flow."""

    DIRECT = "direct"
    UPSTREAM = "upstream"  # a fixed host:port instead of the requested destination
    RESOLVE = "resolve"  # resolve the requested name here and dial the address
    REJECT = "reject"
    VIA = "via"  # through a peer gate's tunnel


class RelayMode(StrEnum):
    AUTO = "auto"  # splice when both ends are kernel TCP sockets, copy otherwise
    SPLICE = "splice"
    COPY = "copy"


class UdpMapping(StrEnum):
    """How a transparent UDP listener maps clients to upstream sockets (RFC 4787 terms)."""

    FULL_CONE = "full-cone"  # one socket per client: answers from any remote reach it (STUN, games)
    SYMMETRIC = "symmetric"  # one socket per client and destination: answers only from there


class CaptureMode(StrEnum):
    TPROXY = "tproxy"
    REDIRECT = "redirect"


class CaptureRole(StrEnum):
    ROUTER = "router"  # forwarded traffic
    EGRESS = "egress"  # this host's outbound traffic
    INGRESS = "ingress"  # traffic arriving for this host


class CaptureBackend(StrEnum):
    NFTABLES = "nftables"
    IPTABLES = "iptables"


class CaptureApply(StrEnum):
    AUTO = "auto"  # apply on start, clear on exit
    MANUAL = "manual"  # ``ugate rules apply|clear``


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogAccess(StrEnum):
    """Where access-log records go when it is not a file path."""

    STDERR = "stderr"
    OFF = "off"


# What sniffing recognised in a flow's first bytes ("none": the flow was not sniffed). A Literal, not
# an enum: the sniffers produce these plain strings, and route explanations print them as they are.
Proto = Literal["tls", "http", "h2c", "ssh", "socks", "stun", "dns", "quic", "dtls", "wireguard", "unknown",
                "none"]
PROTOCOLS: tuple[Proto, ...] = get_args(Proto)


class ProxyProtocol(StrEnum):
    V1 = "v1"
    V2 = "v2"


class Transport(StrEnum):
    """The socket type a listener binds: listeners of different transports never share a port's bind."""

    TCP = "tcp"
    UDP = "udp"
