"""``ugate flows`` and ``ugate peers``: ask the admin listener named in the config (or given) and print
its answer as a table."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from typing import Any, TextIO

from gate.config import GateConfig
from gate.control_specs import AdminSpec
from gate.errors import ConfigError

__all__ = ["AdminClient", "print_flows", "print_peers"]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class AdminClient:
    """Where the admin API is (``http://HOST:PORT`` or a unix socket path) and its token."""

    def __init__(self, where: str, token: str | None, timeout: float = 10.0) -> None:
        self.where = where
        self.token = token
        self.timeout = timeout

    @classmethod
    def of(cls, config: GateConfig | None, where: str | None, token: str | None) -> AdminClient:
        """From ``--admin`` / ``--token``, else the config's first admin listener (and its token)."""
        spec = next((s for s in config.listeners if isinstance(s, AdminSpec)), None) if config else None
        if where is None:
            if spec is None:
                raise ConfigError(["the config has no admin listener: give --admin URL"])
            where = spec.unix_path or f"http://{spec.listen}"
        if token is None and spec is not None:
            from gate.admin.api import load_token

            raw = load_token(spec)
            token = raw.decode() if raw is not None else None
        return cls(where, token)

    def get(self, path: str, method: str = "GET") -> tuple[int, Any]:
        if self.where.startswith("/"):
            conn: http.client.HTTPConnection = _UnixConnection(self.where, self.timeout)
        else:
            host = self.where.removeprefix("http://").rstrip("/")
            conn = http.client.HTTPConnection(host, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            conn.request(method, path, headers=headers)
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        try:
            return answer.status, json.loads(body)
        except ValueError:
            return answer.status, {"error": body.decode("utf-8", "replace")}


def _bytes(n: float) -> str:
    for unit in ("B", "K", "M"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}G"


_COLUMNS = ("ID", "LISTENER", "STATE", "CLIENT", "DESTINATION", "RULE", "VIA", "UP", "DOWN", "AGE")


def flow_rows(answer: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for f in answer["flows"]:
        dst = f["host"] or f["sni"] or f["dst"] or "-"
        if f["host"] and f["dst"] and not f["dst"].startswith(f["host"]):
            dst = f"{f['host']} ({f['dst']})"
        via = f["peer"] or f["upstream"] or f["action"] or "-"
        rows.append((f["id"], f["listener"], f["state"], f["client"], dst, f["rule"] or "-", via,
                     _bytes(f["bytes_up"]), _bytes(f["bytes_down"]), f"{f['age']:.1f}s"))
    return rows


def _table(columns: tuple[str, ...], rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    for row in (columns, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


def print_flows(client: AdminClient, watch: float | None, out: TextIO = sys.stdout) -> int:
    """The live flows; with ``watch``, again every ``watch`` seconds (like top) until interrupted."""
    try:
        while True:
            status, answer = client.get("/flows")
            if status != 200:
                print(f"admin API: {status} {answer.get('error', '')}", file=sys.stderr)
                return 1
            if watch is not None:
                out.write("\x1b[H\x1b[2J")  # home, clear: the table replaces the last one
            rows = flow_rows(answer)
            print(f"{len(rows)} flows, {_bytes(answer['upload_total'])} up, {_bytes(answer['download_total'])} down"
                  f" (open flows only)", file=out)
            _table(_COLUMNS, rows, out)
            out.flush()
            if watch is None:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"admin API at {client.where}: {e}", file=sys.stderr)
        return 1


def print_peers(client: AdminClient, out: TextIO = sys.stdout) -> int:
    try:
        status, answer = client.get("/peers")
    except OSError as e:
        print(f"admin API at {client.where}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"admin API: {status} {answer.get('error', '')}", file=sys.stderr)
        return 1
    rows: list[tuple[str, ...]] = [(p["name"], p["address"] or "-", "up" if p["up"] else "down",
             " ".join(f"{t}={n}" for t, n in sorted(p["streams"].items())), p["last_error"] or "")
            for p in answer["peers"]]
    _table(("PEER", "ADDRESS", "TUNNEL", "STREAMS", "LAST ERROR"), rows, out)
    return 0
