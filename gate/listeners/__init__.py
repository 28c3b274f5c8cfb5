"""Listener kinds: one module each, chosen by the spec class the config produced."""

from __future__ import annotations

from gate.config import ForwardSpec, HttpSpec, ListenerSpec, RedirectSpec, Socks5Spec, TproxySpec
from gate.listeners.base import Context, Listener
from gate.listeners.forward import ForwardListener
from gate.listeners.http_proxy import HttpListener
from gate.listeners.socks import SocksListener
from gate.listeners.transparent import RedirectListener, TproxyListener

__all__ = ["SERVERS", "Context", "Listener", "make_listener"]

SERVERS: dict[type[ListenerSpec], type[Listener]] = {
    Socks5Spec: SocksListener,
    HttpSpec: HttpListener,
    ForwardSpec: ForwardListener,
    TproxySpec: TproxyListener,
    RedirectSpec: RedirectListener,
}


def make_listener(spec: ListenerSpec, ctx: Context) -> Listener:
    return SERVERS[type(spec)](spec, ctx)
