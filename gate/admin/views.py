"""What the admin API shows, as JSON-able values: live flows, peers, the running config (secrets
redacted). Pure functions of the gate's state; merging several workers' answers is here too."""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

from gate.addr import Endpoint
from gate.flow import Flow
from gate.metrics import live_bytes

__all__ = ["REDACTED", "config_view", "flow_view", "merge_peers", "peer_rows", "totals"]

REDACTED = "<redacted>"
# Config fields whose values are secrets (SOCKS/HTTP users' passwords); paths to key files and the names
# of environment variables are not secrets and stay visible.
_SECRET_FIELDS = ("users", "password", "secret", "psk")


def flow_view(flow: Flow, now: float, pid: int) -> dict[str, Any]:
    """One live flow, as GET /flows lists it (the access-log record's fields, with live bytes and age)."""
    up, down = live_bytes(flow)
    return {
        "id": f"{pid}-{flow.id}",
        "pid": pid,
        "flow": flow.id,
        "listener": flow.listener,
        "state": flow.state.name.lower(),
        "client": str(flow.client),
        "dst": str(flow.dst) if flow.dst else None,
        "host": flow.host,
        "protocol": flow.protocol,
        "sni": flow.sni,
        "alpn": list(flow.alpn),
        "rule": flow.rule,
        "action": str(flow.action) if flow.action else None,
        "upstream": str(flow.upstream) if flow.upstream else None,
        "peer": flow.peer,
        "path": flow.path,
        "bytes_up": up,
        "bytes_down": down,
        "start": round(flow.started, 3),
        "age": round(max(now - flow.started, 0.0), 3),
    }


def totals(flows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    up = down = 0
    for flow in flows:
        up += flow["bytes_up"]
        down += flow["bytes_down"]
    return {"upload_total": up, "download_total": down}


def peer_rows(status: Iterable[tuple[str, Endpoint | None, bool, int, str]]) -> list[dict[str, Any]]:
    """GET /peers of one process, from ``Mesh.status()``."""
    return [{"name": name, "address": str(address) if address else None, "up": up, "streams": {"h2": streams},
             "last_error": last_error or None}
            for name, address, up, streams, last_error in status]


def merge_peers(answers: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Workers' peer lists as one: a peer is up if any worker's tunnel is, streams add up."""
    merged: dict[str, dict[str, Any]] = {}
    for rows in answers:
        for row in rows:
            have = merged.get(row["name"])
            if have is None:
                merged[row["name"]] = {**row, "streams": dict(row["streams"]), "workers_up": int(row["up"])}
                continue
            have["up"] = have["up"] or row["up"]
            have["workers_up"] += int(row["up"])
            for transport, n in row["streams"].items():
                have["streams"][transport] = have["streams"].get(transport, 0) + n
            have["last_error"] = have["last_error"] or row["last_error"]
    return list(merged.values())


def config_view(value: Any, key: str = "") -> Any:
    """The config as JSON values, with secret fields' values replaced by REDACTED."""
    if any(secret in key for secret in _SECRET_FIELDS):
        if isinstance(value, Mapping):
            return {str(k): REDACTED for k in value}
        return REDACTED if value else value
    if isinstance(value, Endpoint):
        return str(value) if value.port else value.host
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = getattr(type(value), "kind", None)  # a listener spec's kind is a class attribute
        out: dict[str, Any] = {"kind": kind} if isinstance(kind, str) else {}
        for f in dataclasses.fields(value):
            out[f.name] = config_view(getattr(value, f.name), f.name)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): config_view(v, str(k)) for k, v in value.items()}
    if isinstance(value, tuple | list | frozenset | set):
        return [config_view(v) for v in value]
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network | PurePath):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
