"""The ``admin`` listener kind: the admin API (gate.admin.api) on loopback TCP or a unix socket, and, with
workers, this worker's private socket its siblings ask (gate.admin.siblings)."""

from __future__ import annotations

import asyncio
import logging
import os

from gate.accept import bind_listening_socket
from gate.admin.api import AdminApi, load_token
from gate.admin.http import HttpServer
from gate.admin.siblings import Siblings, bind_unix, unlink_if_ours
from gate.config import GateConfig
from gate.context import Context
from gate.control_specs import AdminSpec

__all__ = ["AdminListener"]

log = logging.getLogger("ugate")


def capture_rules(config: GateConfig) -> tuple[str, int] | None:
    """(backend, rules) the gate installed for its run (capture.apply auto; a running gate holds them):
    nft statements, or iptables rules, plus the policy routing rules and routes."""
    from gate.capture import rules_of

    found = rules_of(config)
    if found is None or config.capture is None or config.capture.apply != "auto":
        return None
    cap, rules = found
    statements = [line for line in rules.nft.splitlines()
                  if line.strip() and not line.strip().startswith(("#", "table", "chain", "type", "}", "flags",
                                                                   "set", "map", "elements", "policy"))]
    return str(cap.backend), len(statements) + len(rules.iptables) + len(rules.ip_rules) + len(rules.routes)


class AdminListener:
    """Serves the admin API; not a flow listener (its connections are not flows, nor counted as such)."""

    def __init__(self, spec: AdminSpec, ctx: Context) -> None:
        self.spec = spec
        self.ctx = ctx
        self.servers: list[HttpServer] = []
        self.siblings: Siblings | None = None
        self._inode: int | None = None  # of the unix socket file we bound
        self._starting: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Bind now (a port in use fails the start, as other listeners do); serve once the loop runs."""
        token = load_token(self.spec)  # (preflight read it too: only a file changed since fails here)
        if self.ctx.config is not None:
            self.ctx.metrics.capture = capture_rules(self.ctx.config)
        if self.ctx.reuse_port and self.ctx.config is not None and self.ctx.config.workers > 1:
            try:
                self.siblings = Siblings(os.getppid())
            except OSError as e:
                log.error("admin %s: answers for this worker only: %s", self.spec.name, e)
        api = AdminApi(self.ctx, self.spec, token, self.siblings)
        path = self.spec.unix_path
        if path is not None:
            sock, self._inode = bind_unix(path)
        else:
            sock = bind_listening_socket(self.spec.listen, reuse_port=self.ctx.reuse_port)
        wait = self.spec.timeouts.handshake
        self.servers.append(HttpServer(sock, api.public, f"admin {self.spec.name}", wait))
        if self.siblings is not None:
            self.servers.append(HttpServer(self.siblings.sock, api.private, f"admin {self.spec.name} (workers)", wait))
        self._starting = asyncio.get_running_loop().create_task(self._start())
        log.info("listener %s (admin, auth %s) on %s", self.spec.name, self.spec.auth, path or self.spec.listen)

    async def _start(self) -> None:
        for server in self.servers:
            await server.start()

    def stop_accepting(self) -> None:
        """Nothing yet: the API answers while the flows drain (an operator may watch them go)."""

    async def drain(self, timeout: float) -> None:
        """Close once the flows have ended, or ``timeout`` passed (then the other listeners cut them)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.ctx.live and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._starting is not None:
            await self._starting
        path = self.spec.unix_path
        if path is not None and self._inode is not None:
            unlink_if_ours(path, self._inode)
        await asyncio.gather(*(server.close() for server in self.servers))
        for server in self.servers:
            server.sock.close()
        if self.siblings is not None:
            self.siblings.close()
