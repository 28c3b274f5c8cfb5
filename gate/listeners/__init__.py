"""Listener kinds: one module each, chosen by the spec class the config produced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gate.admin import AdminListener
from gate.config import (
    AdminSpec,
    ForwardSpec,
    H2Spec,
    HttpSpec,
    ListenerSpec,
    MuxSpec,
    RedirectSpec,
    SniSpec,
    Socks5Spec,
    StunSpec,
    TproxySpec,
    TproxyUdpSpec,
)
from gate.context import Context
from gate.control_specs import WebrtcSignalSpec
from gate.listeners.forward import ForwardListener
from gate.listeners.h2 import H2Listener
from gate.listeners.http_proxy import HttpListener
from gate.listeners.mux import MuxListener
from gate.listeners.sni import SniListener
from gate.listeners.socks import SocksListener
from gate.listeners.stun import StunListener
from gate.listeners.tcp import Server, TcpListener
from gate.listeners.tproxy_udp import TproxyUdpListener
from gate.listeners.transparent import RedirectListener, TproxyListener
from gate.listeners.webrtc_signal import WebrtcSignalListener

__all__ = ["SERVERS", "Server", "TcpListener", "make_listener"]

SERVERS: dict[type[ListenerSpec], Callable[[Any, Context], Server]] = {
    Socks5Spec: SocksListener,
    HttpSpec: HttpListener,
    ForwardSpec: ForwardListener,
    TproxySpec: TproxyListener,
    RedirectSpec: RedirectListener,
    TproxyUdpSpec: TproxyUdpListener,
    SniSpec: SniListener,
    MuxSpec: MuxListener,
    H2Spec: H2Listener,
    StunSpec: StunListener,
    WebrtcSignalSpec: WebrtcSignalListener,
    AdminSpec: AdminListener,
}


def make_listener(spec: ListenerSpec, ctx: Context) -> Server:
    return SERVERS[type(spec)](spec, ctx)
