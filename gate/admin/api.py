"""The admin API's endpoints: metrics, live flows (list, cut), peers, route explain, config, reload.

Public requests come through the admin listener, checked against the bearer token; with workers, the
same process answers for every worker by asking its siblings' private sockets, where the ``/_local/``
endpoints give this process's own numbers (the directory's permissions guard those; no token).
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from gate.admin.http import Request, Response, error
from gate.admin.siblings import Siblings
from gate.admin.views import config_view, flow_view, merge_peers, peer_rows, totals
from gate.context import Context
from gate.control_specs import AdminAuth, AdminSpec, read_token
from gate.errors import ConfigError
from gate.flow import Close
from gate.metrics import Snapshot, merge, render

__all__ = ["AdminApi", "Reload", "load_token"]

# POST /reload's work (hot reload): returns what changed, raises ConfigError when the new config is refused.
Reload = Callable[[], Awaitable[str]]
def load_token(spec: AdminSpec) -> bytes | None:
    """The bearer token of ``spec`` (None: no token asked); ConfigError when it cannot be had."""
    if spec.token_file is None and spec.token_env is None:
        return None
    try:
        return read_token(spec.token_file, spec.token_env).encode()
    except ValueError as e:
        key = "token_file" if spec.token_file is not None else "token_env"
        raise ConfigError([f"listener {spec.name}: {key}: {e}"]) from None


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode() + b"\n")


class AdminApi:
    """Answers admin requests for one process (``siblings``: the other workers', when there are)."""

    reload: ClassVar[Reload | None] = None  # set by gate.admin.set_reload (the hot-reload part)

    def __init__(self, ctx: Context, spec: AdminSpec, token: bytes | None, siblings: Siblings | None) -> None:
        self.ctx = ctx
        self.spec = spec
        self.token = token
        self.siblings = siblings
        self.pid = os.getpid()

    # -- entry points ----------------------------------------------------------------------------

    async def public(self, req: Request) -> Response:
        if self.spec.auth == AdminAuth.TOKEN and not self._authorized(req):
            return Response(401, b'{"error":"a valid bearer token is needed"}\n',
                            headers=(("www-authenticate", 'Bearer realm="ugate"'),))
        if req.path.startswith("/_local/"):
            return error(404, f"no such endpoint: {req.path}")
        return await self._route(req)

    async def private(self, req: Request) -> Response:
        """A sibling asks for this process's own part."""
        if req.method == "GET" and req.path == "/_local/metrics":
            return _json(self._snapshot())
        if req.method == "GET" and req.path == "/_local/flows":
            return _json(self._flows())
        if req.method == "GET" and req.path == "/_local/peers":
            return _json(self._peers())
        if req.method == "DELETE" and req.path.startswith("/_local/flows/"):
            return self._cut(req.path.removeprefix("/_local/flows/"))
        return error(404, f"no such endpoint: {req.path}")

    def _authorized(self, req: Request) -> bool:
        given = req.headers.get("authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or self.token is None:
            return False
        return hmac.compare_digest(credentials.strip().encode("latin-1"), self.token)

    async def _route(self, req: Request) -> Response:
        method, path = req.method, req.path.rstrip("/") or "/"
        if path == "/metrics" and method == "GET":
            body, content_type = render(merge([self._snapshot(), *await self._from_siblings("/_local/metrics")]))
            return Response(200, body, content_type)
        if path == "/flows" and method == "GET":
            flows = [*self._flows(), *(f for rows in await self._from_siblings("/_local/flows") for f in rows)]
            flows.sort(key=lambda f: f["start"])
            return _json({**totals(flows), "flows": flows})
        if path.startswith("/flows/") and method == "DELETE":
            return await self._cut_anywhere(path.removeprefix("/flows/"))
        if path == "/peers" and method == "GET":
            return _json({"peers": merge_peers([self._peers(), *await self._from_siblings("/_local/peers")])})
        if path == "/route" and method == "GET":
            return self._explain(req.query)
        if path == "/config" and method == "GET":
            return _json(config_view(self.ctx.config))
        if path == "/reload" and method == "POST":
            return await self._reload()
        if path in ("/metrics", "/flows", "/peers", "/route", "/config", "/reload") or path.startswith("/flows/"):
            return error(405, f"{method} is not allowed on {path}")
        return error(404, f"no such endpoint: {path}")

    # -- the parts -------------------------------------------------------------------------------

    async def _from_siblings(self, target: str) -> list[Any]:
        if self.siblings is None:
            return []
        return [body for status, body in await self.siblings.ask("GET", target) if status == 200]

    def _snapshot(self) -> Snapshot:
        mesh = self.ctx.mesh
        status = getattr(mesh, "status", None)
        peers = [(name, up, {"h2": streams}) for name, _, up, streams, _ in status()] if status else []
        return self.ctx.metrics.snapshot(self.ctx.live.values(), self.ctx.sniff_outcomes, peers)

    def _flows(self) -> list[dict[str, Any]]:
        now = time.time()
        return [flow_view(flow, now, self.pid) for flow in list(self.ctx.live.values())]

    def _peers(self) -> list[dict[str, Any]]:
        status = getattr(self.ctx.mesh, "status", None)
        return peer_rows(status()) if status else []

    def _cut(self, number: str) -> Response:
        """Cut this process's flow ``number``: a relaying flow's both sides get a reset."""
        if not number.isdigit():
            return error(400, f"bad flow id {number!r}")
        flow = self.ctx.live.get(int(number))
        if flow is None:
            return error(404, f"no open flow {self.pid}-{number}")
        if flow.relay is None:
            return error(409, f"flow {self.pid}-{number} is {flow.state.name.lower()} ({flow.path or 'no relay'}): "
                              "only flows whose bytes a relay moves can be cut")
        flow.closing(Close.CUT, "cut through the admin API")
        flow.relay.abort("cut")
        return _json({"cut": f"{self.pid}-{number}"})

    async def _cut_anywhere(self, flow_id: str) -> Response:
        """DELETE /flows/PID-N (as /flows lists it) or /flows/N (single process only)."""
        pid, sep, number = flow_id.rpartition("-")
        if not sep:
            if self.siblings is not None:
                return error(400, "with workers, a flow id is PID-N, as GET /flows lists it")
            return self._cut(number)
        if not pid.isdigit():
            return error(400, f"bad flow id {flow_id!r}")
        if int(pid) == self.pid:
            return self._cut(number)
        if self.siblings is None:
            return error(404, f"no open flow {flow_id}")
        answers = await self.siblings.ask("DELETE", f"/_local/flows/{number}", [self.siblings.path_of(int(pid))])
        if not answers:
            return error(404, f"no worker {pid} answers")
        status, body = answers[0]
        return _json(body, status)

    def _explain(self, query: dict[str, str]) -> Response:
        from gate.explain import explain

        config = self.ctx.config
        if config is None:
            return error(503, "no config")
        listener, dst = query.get("listener"), query.get("dst")
        if not listener or not dst:
            return error(400, "listener and dst are required (dst=HOST:PORT, or dst=HOST&port=PORT)")
        port_text = query.get("port")
        if port_text is None:
            host, sep, port_text = dst.rpartition(":")
            if not sep:
                return error(400, "dst needs a port (HOST:PORT), or give port=")
            dst = host.removeprefix("[").removesuffix("]")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return error(400, f"bad port {port_text!r}")
        alpn = tuple(a for a in query.get("alpn", "").split(",") if a)
        try:
            lines = explain(config, listener, dst, int(port_text), src=query.get("src"), host=query.get("host"),
                            protocol=query.get("protocol"), sni=query.get("sni"), alpn=alpn)
        except ValueError as e:
            return error(404, str(e))
        return _json({"explain": lines, "decision": lines[-1]})

    async def _reload(self) -> Response:
        reload = AdminApi.reload
        if reload is None:
            return error(501, "hot reload is not built into this gate yet: restart it to apply a new config")
        try:
            done = await reload()
        except ConfigError as e:
            return _json({"error": "the new config was refused; the running one stays", "problems": e.problems},
                         409)
        return _json({"reloaded": done})
