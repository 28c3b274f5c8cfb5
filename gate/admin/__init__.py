"""The admin listener: Prometheus metrics and a JSON API over the live flows, peers, routes and config."""

from __future__ import annotations

from gate.admin.api import AdminApi, Reload, load_token
from gate.admin.server import AdminListener

__all__ = ["AdminApi", "AdminListener", "Reload", "load_token", "set_reload"]


def set_reload(reload: Reload | None) -> None:
    """Wire POST /reload to the hot reload (until then it answers 501)."""
    AdminApi.reload = reload
