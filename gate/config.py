"""The YAML configuration, validated into frozen dataclasses with every problem located.

Listener kinds parse themselves (gate.specs, one class per kind, as mitmproxy's mode_specs); this module
reads the rest (routes, mesh, peers, capture, log) and the checks that span sections. What needs files
(keys, certificates) is checked by gate.preflight, which ``ugate check`` and ``run`` both call.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from gate.control_specs import AdminSpec  # (registers those kinds too)
from gate.errors import ConfigError
from gate.mesh_spec import MeshSpec, PeerSpec, parse_mesh, parse_peers
from gate.route_spec import Match, Route, check_offload, parse_route
from gate.specs import (
    ForwardSpec,
    H2Spec,
    HttpSpec,
    ListenerSpec,
    MuxSpec,
    RedirectSpec,
    SniSpec,
    Socks5Spec,
    StunSpec,
    Timeouts,
    TproxySpec,
    TproxyUdpSpec,
    listener_clashes,
    parse_listener,
    parse_timeouts,
)
from gate.validate import IPNetwork, Problems, interfaces, mark, networks, one_of, ports, positive_int, string
from gate.vocab import (
    PROTOCOLS,
    Action,
    CaptureApply,
    CaptureBackend,
    CaptureMode,
    CaptureRole,
    LogAccess,
    LogLevel,
    Proto,
    ProxyProtocol,
    RelayMode,
    Transport,
    UdpMapping,
)
from gate.wg_spec import WireguardSpec, parse_wireguard

__all__ = [
    "ACTIONS",
    "PROTOCOLS",
    "RELAY_MODES",
    "Action",
    "AdminSpec",
    "CaptureApply",
    "CaptureBackend",
    "CaptureMode",
    "CaptureOnFailure",
    "CaptureRole",
    "CaptureSpec",
    "ForwardSpec",
    "GateConfig",
    "H2Spec",
    "HttpSpec",
    "ListenerSpec",
    "LogAccess",
    "LogLevel",
    "LogSpec",
    "Match",
    "MeshSpec",
    "MuxSpec",
    "PeerSpec",
    "Proto",
    "ProxyProtocol",
    "RedirectSpec",
    "RelayMode",
    "Route",
    "SniSpec",
    "Socks5Spec",
    "StunSpec",
    "Timeouts",
    "TproxySpec",
    "TproxyUdpSpec",
    "Transport",
    "UdpMapping",
    "load_config",
    "parse_config",
]

RELAY_MODES = tuple(RelayMode)
ACTIONS = tuple(Action)


@dataclass(frozen=True)
class LogSpec:
    level: LogLevel = LogLevel.INFO
    access: LogAccess | str = LogAccess.STDERR  # or a file path


class CaptureOnFailure(StrEnum):
    """What captured traffic does while no gate serves it (crash, kill -9); see tproxy.rules."""

    CLOSED = "closed"  # dropped (TPROXY) or refused (REDIRECT): a kill switch
    OPEN = "open"  # bypasses the gate: the rules die with the process that installed them


@dataclass(frozen=True)
class CaptureSpec:
    """Which traffic the firewall steers to ugate; see tproxy.rules for the rule sets built from it."""

    mode: CaptureMode
    role: CaptureRole
    interfaces: tuple[str, ...] = ()  # router/ingress: capture what arrives on these (empty: any but lo)
    ports: tuple[tuple[int, int], ...] = ()  # destination ports (empty: all)
    exclude: tuple[IPNetwork, ...] = ()  # destinations never captured
    sources: tuple[IPNetwork, ...] = ()  # only these sources (empty: any)
    backend: CaptureBackend = CaptureBackend.NFTABLES
    apply: CaptureApply = CaptureApply.MANUAL
    on_failure: CaptureOnFailure = CaptureOnFailure.CLOSED
    route_mark: int = 0x1  # fwmark of TPROXYed packets -> policy routing table below
    table: int = 100
    port4: int | None = None  # listener ports the rules steer to (from the config's listeners)
    port6: int | None = None
    udp_port4: int | None = None  # tproxy_udp listeners, if any
    udp_port6: int | None = None


@dataclass(frozen=True)
class GateConfig:
    listeners: tuple[ListenerSpec, ...]
    routes: tuple[Route, ...]
    timeouts: Timeouts = field(default_factory=Timeouts)
    log: LogSpec = LogSpec()
    # Processes sharing each listening port through SO_REUSEPORT: one event loop uses one core.
    workers: int = 1
    # SO_MARK on every upstream socket (needs CAP_NET_ADMIN); capture rules skip it so ugate never
    # captures its own traffic. Defaults to 0x2 when capture is configured, else unset.
    mark: int | None = None
    capture: CaptureSpec | None = None
    mesh: MeshSpec | None = None
    peers: tuple[PeerSpec, ...] = ()
    wireguard: WireguardSpec | None = None  # endpoints of WireGuard peers found by ICE (gate.wireguard)


_CAPTURE_KEYS = ("mode", "role", "interfaces", "ports", "exclude", "sources", "backend", "apply", "route_mark",
                 "table", "on_failure")


def _ports_of(listeners: list[ListenerSpec], kind: str) -> tuple[int | None, int | None]:
    """The IPv4 and IPv6 listening ports of the first listeners of ``kind``."""
    of_kind = [spec for spec in listeners if spec.kind == kind]
    return (next((s.listen.port for s in of_kind if ":" not in s.listen.host), None),
            next((s.listen.port for s in of_kind if ":" in s.listen.host), None))


def _capture(raw: Any, listeners: list[ListenerSpec], p: Problems) -> CaptureSpec | None:
    if raw is None:
        return None
    w = "capture"
    m = p.mapping(raw, w, _CAPTURE_KEYS)
    mode = p.get(m, "mode", w, one_of(CaptureMode), CaptureMode.TPROXY)
    port4, port6 = _ports_of(listeners, mode)
    udp4, udp6 = _ports_of(listeners, TproxyUdpSpec.kind)
    if port4 is None and port6 is None and udp4 is None and udp6 is None:
        p.add(f"{w}.mode", f"capture mode {mode} needs a listener of kind {mode}")
    if (udp4 is not None or udp6 is not None) and mode != CaptureMode.TPROXY:
        p.add(f"{w}.mode", "tproxy_udp listeners need capture mode tproxy (REDIRECT loses UDP destinations)")
    backend = p.get(m, "backend", w, one_of(CaptureBackend), CaptureBackend.NFTABLES)
    apply = p.get(m, "apply", w, one_of(CaptureApply), CaptureApply.MANUAL)
    on_failure = p.get(m, "on_failure", w, one_of(CaptureOnFailure), CaptureOnFailure.CLOSED)
    if on_failure == CaptureOnFailure.OPEN and backend != CaptureBackend.NFTABLES:
        p.add(f"{w}.on_failure", "open needs backend nftables (iptables rules cannot die with the gate; "
                                 "its TPROXY drops what no socket takes, i.e. closed)")
    if on_failure == CaptureOnFailure.OPEN and apply != CaptureApply.AUTO:
        p.add(f"{w}.on_failure", "open needs apply: auto (the rules live as long as the gate that installed them)")
    return CaptureSpec(
        mode=mode,
        role=p.get(m, "role", w, one_of(CaptureRole), CaptureRole.ROUTER),
        interfaces=p.get(m, "interfaces", w, interfaces, ()),
        ports=p.get(m, "ports", w, ports, ()),
        exclude=p.get(m, "exclude", w, networks, ()),
        sources=p.get(m, "sources", w, networks, ()),
        backend=backend,
        apply=apply,
        on_failure=on_failure,
        route_mark=p.get(m, "route_mark", w, mark, 0x1),
        table=p.get(m, "table", w, positive_int, 100),
        port4=port4, port6=port6, udp_port4=udp4, udp_port6=udp6,
    )


def _workers(value: Any) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0))
    return positive_int(value)


def _access(value: Any) -> LogAccess | str:
    """YAML 1.1 reads an unquoted ``off`` (or ``no``) as false: that still means no access log."""
    if value is False:
        return LogAccess.OFF
    if value is True:
        raise ValueError("true is not a place for the access log (stderr, off, or a file path)")
    text = string(value)
    return LogAccess(text) if text in tuple(LogAccess) else text


def _listeners(raw: Any, timeouts: Timeouts, p: Problems) -> list[ListenerSpec]:
    listeners: list[tuple[int, ListenerSpec]] = []
    for i, item in enumerate(raw):
        before = len(p.items)
        spec = parse_listener(item, f"listeners[{i}]", timeouts, p)
        if spec is None or len(p.items) > before:
            continue  # defaults stand in for its bad fields: comparing them would report nonsense
        for _, other in listeners:
            if other.name == spec.name:
                p.add(f"listeners[{i}].name", f"{spec.name!r} is used twice")
            if (clash := listener_clashes(spec, other)) is not None:
                p.add(f"listeners[{i}].listen", clash)
        listeners.append((i, spec))
    return [spec for _, spec in listeners]


def _check_ingress_source(capture: CaptureSpec | None, listeners: list[ListenerSpec], routes: list[Route],
                          mark_: int | None, p: Problems) -> None:
    """An ingress sidecar that dials the app from the client's address (preserve_source) needs the return
    routing of tproxy.ingress: TPROXY capture, whose transparent sockets take the app's replies back, and
    the bypass mark on the gate's sockets, which is how those connections are told from the app's own."""
    if capture is None or capture.role != CaptureRole.INGRESS:
        return
    where = [f"listeners[{i}] ({s.name})" for i, s in enumerate(listeners) if s.preserve_source]
    where += [f"routes[{i}]" for i, r in enumerate(routes) if r.preserve_source]
    if not where:
        return
    if capture.mode != CaptureMode.TPROXY:
        p.add("capture.mode", f"preserve_source on an ingress sidecar ({', '.join(where)}) needs mode tproxy: the "
                              "app answers the client's address, and only a transparent socket can take that back")
    if mark_ == capture.route_mark:  # (capture's default mark is 0x2: a config can only lack it this way)
        p.add("config.mark", f"preserve_source on an ingress sidecar ({', '.join(where)}) needs the gate's "
                             "connections to the app marked apart from what TPROXY marks: the return routing "
                             "finds them by config.mark")


def _check_loopback_upstreams(listeners: list[ListenerSpec], routes: list[Route], p: Problems) -> None:
    """An upstream on a loopback address cannot be dialled from the client's address: the kernel refuses
    to route its answers (from 127.0.0.0/8 or ::1 to another host) before any rule could steer them."""
    for r in routes:
        try:
            if r.upstream is None or not ipaddress.ip_address(r.upstream.host).is_loopback:
                continue
        except ValueError:  # a name: what it resolves to is known only when dialling
            continue
        if r.preserve_source or any(s.preserve_source for s in listeners
                                    if not r.match.listener or s.name in r.match.listener):
            p.add(f"routes[{r.index}].upstream", f"{r.upstream} is a loopback address, which cannot answer a "
                                                 "client's address (preserve_source): use an interface's address")


def parse_config(raw: Any, base: Path | None = None) -> GateConfig:
    """Validate a parsed YAML document; raise ConfigError listing every problem. Routes' list files are
    read relative to ``base`` (the config file's directory; the working directory without one)."""
    p = Problems()
    top = p.mapping(raw, "config", ("listeners", "routes", "timeouts", "log", "workers", "mark", "capture", "mesh",
                                    "peers", "wireguard"))
    workers = p.get(top, "workers", "config", _workers, 1)
    timeouts = parse_timeouts(top.get("timeouts"), "timeouts", Timeouts(), p)
    lm = p.mapping(top.get("log"), "log", ("level", "access"))
    stderr: LogAccess | str = LogAccess.STDERR
    log = LogSpec(level=p.get(lm, "level", "log", one_of(LogLevel), LogLevel.INFO),
                  access=p.get(lm, "access", "log", _access, stderr))
    raw_listeners = top.get("listeners", [])
    # a gate behind NAT may only serve its reverse tunnels: then it needs no listener of its own
    reverse_only = isinstance(top.get("peers"), list) and any(
        isinstance(peer, Mapping) and peer.get("reverse") for peer in top["peers"])
    if not isinstance(raw_listeners, list) or not (raw_listeners or reverse_only):
        p.add("listeners", "expected a non-empty list")
        raw_listeners = []
    listeners = _listeners(raw_listeners, timeouts, p)
    raw_routes = top.get("routes", [{"action": "direct"}])
    if not isinstance(raw_routes, list):
        p.add("routes", "expected a list")
        raw_routes = []
    names_ = {str(item.get("name")) for item in raw_listeners if isinstance(item, Mapping)}
    mesh = parse_mesh(top.get("mesh"), p)
    peers = parse_peers(top.get("peers"), mesh, names_, p)
    peer_names = {peer.name for peer in peers}
    names_ |= {peer.name for peer in peers if peer.reverse}  # their flows' listener, for route matches
    routes = [r for i, item in enumerate(raw_routes)
              if (r := parse_route(item, i, names_, peer_names, p, base)) is not None]
    if mesh is None and any(isinstance(spec, H2Spec) for spec in listeners):
        p.add("mesh", "missing: an h2 listener needs this gate's identity (mesh: {identity: DIR})")
    capture = _capture(top.get("capture"), listeners, p)
    check_offload(routes, (str(capture.mode), str(capture.backend)) if capture else None, p)
    mark_ = p.get(top, "mark", "config", mark, 0x2 if capture else None)
    if capture and mark_ == capture.route_mark:
        p.add("config.mark", f"must differ from capture.route_mark ({mark_:#x})")
    _check_ingress_source(capture, listeners, routes, mark_, p)
    _check_loopback_upstreams(listeners, routes, p)
    wireguard = parse_wireguard(top.get("wireguard"), mesh, peers, workers, p)
    if p.items:
        raise ConfigError(p.items)
    return GateConfig(listeners=tuple(listeners), routes=tuple(routes), timeouts=timeouts, log=log, workers=workers,
                      mark=mark_, capture=capture, mesh=mesh, peers=tuple(peers),
                      wireguard=wireguard)


def load_config(path: str | Path) -> GateConfig:
    """Read and validate a YAML file; raise ConfigError (located) on any problem."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"{path}: {e.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    return parse_config(raw, Path(path).parent)
