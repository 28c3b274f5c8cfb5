"""Host:port endpoints as the config and the wire spell them (IPv6 in brackets)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["Endpoint", "is_ip", "parse_endpoint"]

# RFC 1123 host names, plus "_" seen in the wild (SRV-style names), each label <= 63 chars.
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host (IP literal or DNS name, IPv6 without brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``host:port`` / ``[v6]:port``; raise ValueError with no location (the caller adds it)."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not host:port")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not _is_v6(host):
            raise ValueError(f"{text!r} is not host:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host or not host:
            raise ValueError(f"{text!r} is not host:port")
        if not (is_ip(host) or _HOSTNAME.match(host)):
            raise ValueError(f"{text!r} is not host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return Endpoint(host, int(port))


def _is_v6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
