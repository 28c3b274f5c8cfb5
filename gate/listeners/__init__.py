"""Listener kinds: one module each, chosen by the spec class the config produced."""

from __future__ import annotations

from gate.config import ForwardSpec, HttpSpec, ListenerSpec, Socks5Spec
from gate.listeners.base import Context, Listener
from gate.listeners.forward import ForwardListener
from gate.listeners.http_proxy import HttpListener
from gate.listeners.socks import SocksListener

__all__ = ["SERVERS", "Context", "Listener", "make_listener"]

SERVERS: dict[type[ListenerSpec], type[Listener]] = {
    Socks5Spec: SocksListener,
    HttpSpec: HttpListener,
    ForwardSpec: ForwardListener,
}


def make_listener(spec: ListenerSpec, ctx: Context) -> Listener:
    return SERVERS[type(spec)](spec, ctx)
