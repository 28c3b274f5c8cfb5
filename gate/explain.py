"""Which route a flow would take, line by line: ``ugate route`` prints it, the admin API's GET /route
returns it; one function so both say the same."""

from __future__ import annotations

from gate.addr import is_ip
from gate.config import GateConfig
from gate.router import FlowKey, Router

__all__ = ["explain"]


def explain(config: GateConfig, listener: str, dst: str, port: int, *, src: str | None = None,
            host: str | None = None, protocol: str | None = None, sni: str | None = None,
            alpn: tuple[str, ...] = ()) -> list[str]:
    """One line per route tried, ending with the decision; ValueError when no listener is ``listener``.
    A ``dst`` that is a name is also the flow's host (as a SOCKS domain request), else the SNI is."""
    kind = next((spec.kind for spec in config.listeners if spec.name == listener), None)
    if kind is None:
        raise ValueError(f"no listener is named {listener!r}")
    if host is None and not is_ip(dst):
        host = dst
    if host is None and sni:
        host = sni
    key = FlowKey(listener, src, dst, port, host, protocol, sni, alpn)
    from gate.capture import bypass_of, fastpath_of  # (tproxy's rule builders: only when explaining)

    bypass = kind in ("tproxy", "tproxy_udp") and bool(bypass_of(config))
    fastpath = kind == "tproxy_udp" and bool(fastpath_of(config))
    return Router(config.routes).explain(key, bypass=bypass, fastpath=fastpath)
