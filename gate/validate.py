"""Converters from YAML values to typed ones, and the collector of located problems they report into.

Converters raise ValueError without a location; ``Problems.get`` adds the key's place, so one bad value
never hides the next and ``ugate check`` lists every problem at once.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Callable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeVar

__all__ = [
    "IPNetwork",
    "Problems",
    "as_list",
    "boolean",
    "gate_id",
    "host_pattern",
    "hosts",
    "interfaces",
    "mark",
    "names",
    "network",
    "networks",
    "one_of",
    "port_number",
    "ports",
    "positive_int",
    "positive_number",
    "string",
    "users",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


class Problems:
    """Collects located problems so ``ugate check`` can report all of them at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def get(self, raw: Mapping[str, Any], key: str, where: str, conv: Callable[[Any], T], default: T) -> T:
        if key not in raw or raw[key] is None:
            return default
        try:
            return conv(raw[key])
        except (ValueError, TypeError) as e:
            self.add(f"{where}.{key}", str(e))
            return default

    def mapping(self, raw: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.add(where, f"expected a mapping, got {type(raw).__name__}")
            return {}
        for key in raw:
            if key not in allowed:
                self.add(f"{where}.{key}", f"unknown key (expected one of: {', '.join(allowed)})")
        return raw


def positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{value!r} is not a positive number of seconds")
    return float(value)


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{value!r} is not a positive integer")
    return value


def port_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{value!r} is not a port")
    return value


def one_of(words: type[E]) -> Callable[[Any], E]:
    def conv(value: Any) -> E:
        try:
            return words(value)
        except ValueError:
            raise ValueError(f"{value!r} is not one of: {', '.join(words)}") from None

    return conv


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def users(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and k for k, v in value.items()
    ):
        raise ValueError("expected a mapping of user name to password (strings)")
    return MappingProxyType(dict(value))


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def network(item: Any) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(item), strict=False)
    except ValueError:
        raise ValueError(f"{item!r} is not an IP address or CIDR") from None


def networks(value: Any) -> tuple[IPNetwork, ...]:
    return tuple(network(item) for item in as_list(value))


def ports(value: Any) -> tuple[tuple[int, int], ...]:
    ranges = []
    for item in as_list(value):
        lo, _, hi = str(item).partition("-")
        if not lo.strip().isdigit() or not (hi.strip().isdigit() or not hi):
            raise ValueError(f"{item!r} is not a port or a range like 8000-8999")
        low, high = int(lo), int(hi or lo)
        if not 0 < low <= high < 65536:
            raise ValueError(f"{item!r} is not a port or a range like 8000-8999")
        ranges.append((low, high))
    return tuple(ranges)


def host_pattern(item: Any) -> str:
    """A name, ``*.suffix`` or ``.suffix``, lower case, without a trailing dot."""
    if (not isinstance(item, str) or item.strip(".*") == "" or "*" in item.removeprefix("*.")
            or item.startswith("..")):
        raise ValueError(f"{item!r} is not a host name, *.suffix or .suffix")
    return item.lower().rstrip(".")


def hosts(value: Any) -> tuple[str, ...]:
    return tuple(host_pattern(item) for item in as_list(value))


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def mark(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32:
        raise ValueError(f"{value!r} is not a firewall mark (1 .. 0xffffffff)")
    return value


def names(value: Any) -> tuple[str, ...]:
    return tuple(string(item) for item in as_list(value))


def interfaces(value: Any) -> tuple[str, ...]:
    found = names(value)
    for name in found:
        if len(name) > 15 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"{name!r} is not an interface name")
    return found


def gate_id(value: Any) -> str:
    """A gate ID as ``gate.mesh.identity.gate_id`` writes it: base32 of a SHA-256, lower case, unpadded.

    Checked by decoding, so a placeholder (``REPLACE-WITH-B-ID``) or a truncated copy fails here
    instead of at the first handshake."""
    text = string(value)
    try:
        digest = base64.b32decode(text.upper() + "====", casefold=False)
    except (binascii.Error, ValueError):
        digest = b""
    if len(text) != 52 or text != text.lower() or len(digest) != 32 or \
            base64.b32encode(digest).decode().rstrip("=").lower() != text:
        raise ValueError(f"{text!r} is not a gate ID (52 lower-case base32 characters, as ugate keygen prints)")
    return text
