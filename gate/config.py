"""The YAML configuration, validated into frozen dataclasses with every problem located.

One spec class per listener kind (as mitmproxy's mode_specs): the kind's own fields are checked here,
and ``gate.listeners`` maps each spec class to the server that runs it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import yaml

from gate.addr import Endpoint, parse_endpoint
from gate.errors import ConfigError

__all__ = [
    "ACTIONS",
    "RELAY_MODES",
    "CaptureSpec",
    "ForwardSpec",
    "GateConfig",
    "HttpSpec",
    "ListenerSpec",
    "LogSpec",
    "Match",
    "MuxSpec",
    "RedirectSpec",
    "Route",
    "SniSpec",
    "Socks5Spec",
    "Timeouts",
    "TproxySpec",
    "TproxyUdpSpec",
    "load_config",
    "parse_config",
]

RELAY_MODES = ("auto", "splice", "copy")
ACTIONS = ("direct", "upstream", "resolve", "reject", "via")
LOG_LEVELS = ("debug", "info", "warning", "error")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``handshake``: until the client has said where it goes; ``idle``: no byte either way;
    ``drain``: how long flows may finish after SIGTERM before they are cut."""

    handshake: float = 10.0
    connect: float = 10.0
    sniff: float = 0.3  # wait for a flow's first bytes; server-first protocols wait this long, no more
    idle: float = 300.0
    drain: float = 5.0


@dataclass(frozen=True)
class ListenerSpec:
    """What every listener kind has."""

    kind: ClassVar[str] = ""
    name: str
    listen: Endpoint
    timeouts: Timeouts
    # Each relayed flow holds 2 sockets (and 2 pipes while data moves); 4096 flows stay far below the
    # 20000-descriptor limits common on these machines, for every listener of a small config together.
    max_flows: int = 4096
    relay: str = "auto"
    # Upstream connections leave from the client's own address (IP_TRANSPARENT), as uproxy does.
    preserve_source: bool = False
    # Classify the first bytes before routing (kinds that know the destination at accept: forward,
    # tproxy, redirect), except for flows to these destination ports or addresses (server-first
    # services, or peers whose bytes must not wait).
    sniff: bool = False
    sniff_skip_ports: tuple[tuple[int, int], ...] = ()
    sniff_skip_dst: tuple[IPNetwork, ...] = ()
    # Clients in these ranges (load balancers) must open with a PROXY protocol v1/v2 header, which then
    # names the real client; anyone else's bytes are never read as one.
    proxy_protocol_from: tuple[IPNetwork, ...] = ()

    def sniffs(self, dst: Endpoint) -> bool:
        """Whether a flow to ``dst`` is sniffed before routing."""
        if not self.sniff or any(lo <= dst.port <= hi for lo, hi in self.sniff_skip_ports):
            return False
        if self.sniff_skip_dst:
            try:
                address = ipaddress.ip_address(dst.host)
            except ValueError:  # a name (SOCKS, CONNECT): only addresses are listed
                return True
            return not any(address in net for net in self.sniff_skip_dst)
        return True


@dataclass(frozen=True)
class Socks5Spec(ListenerSpec):
    """SOCKS5 (and SOCKS4/4a, which has no authentication and is refused when users are set)."""

    kind: ClassVar[str] = "socks5"
    users: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class HttpSpec(ListenerSpec):
    """HTTP proxy: CONNECT tunnels and absolute-URI forwarding."""

    kind: ClassVar[str] = "http"
    users: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    realm: str = "ugate"


@dataclass(frozen=True, kw_only=True)
class ForwardSpec(ListenerSpec):
    """Fixed port-forward: every flow's requested destination is ``to``."""

    kind: ClassVar[str] = "forward"
    to: Endpoint


@dataclass(frozen=True)
class TproxySpec(ListenerSpec):
    """Transparent TCP (TPROXY): the accepted socket's local address is the original destination."""

    kind: ClassVar[str] = "tproxy"


@dataclass(frozen=True)
class RedirectSpec(ListenerSpec):
    """REDIRECTed TCP: the original destination comes from conntrack (SO_ORIGINAL_DST)."""

    kind: ClassVar[str] = "redirect"


@dataclass(frozen=True)
class SniSpec(ListenerSpec):
    """SNI ingress: TLS is routed by its server name, never terminated."""

    kind: ClassVar[str] = "sni"
    port: int = 443  # the destination is SNI:port unless a route names an upstream
    default: Endpoint | None = None  # where flows without TLS or SNI go; None: they are closed


@dataclass(frozen=True)
class MuxSpec(HttpSpec):
    """One port for SOCKS5/4a, the HTTP proxy, TLS by SNI and SSH: whichever the client speaks."""

    kind: ClassVar[str] = "mux"
    tls_port: int = 443  # TLS goes to <SNI>:<tls_port> unless a route names an upstream
    ssh: Endpoint | None = None  # where SSH goes; None: SSH is closed
    default: Endpoint | None = None  # anything else (or TLS without SNI); None: closed


@dataclass(frozen=True)
class TproxyUdpSpec(ListenerSpec):
    """Transparent UDP (TPROXY): per-client sessions; replies leave from the server's address."""

    kind: ClassVar[str] = "tproxy_udp"
    # "full-cone": one upstream socket per client, answers from any remote reach the client
    # (endpoint-independent, what STUN/WebRTC and games need); "symmetric": one per client and
    # destination, answers only from that destination.
    mapping: str = "full-cone"
    session_timeout: float = 60.0  # a UDP session without a datagram either way for this long ends


@dataclass(frozen=True)
class Match:
    """Conditions of a route; an empty tuple means "any". Within a field any item may match."""

    listener: tuple[str, ...] = ()
    dst: tuple[IPNetwork, ...] = ()
    port: tuple[tuple[int, int], ...] = ()
    src: tuple[IPNetwork, ...] = ()
    # lower-case; "*.suffix" matches the suffix's subdomains, ".suffix" the suffix itself and its subdomains
    host: tuple[str, ...] = ()
    protocol: tuple[str, ...] = ()  # sniffed protocol: tls, http, h2c, ssh, socks, unknown
    sni: tuple[str, ...] = ()  # TLS server name, exact, "*.suffix" or ".suffix"
    alpn: tuple[str, ...] = ()  # any of these offered by the TLS client


@dataclass(frozen=True)
class Route:
    index: int
    name: str
    match: Match
    action: str
    upstream: Endpoint | None = None
    preserve_source: bool = False
    proxy_protocol: str | None = None  # "v1" | "v2": tell the upstream who the client is, first thing
    via: str | None = None  # action "via": the peer gate whose tunnel carries the flow


@dataclass(frozen=True)
class H2Spec(ListenerSpec):
    """Mesh tunnels from peer gates: TLS 1.3 with client certificates, one HTTP/2 CONNECT stream per flow."""

    kind: ClassVar[str] = "h2"


@dataclass(frozen=True)
class MeshSpec:
    """This gate's identity and how peers are trusted (see gate.mesh)."""

    identity: Path  # directory with key.pem and cert.pem (ugate keygen --dir)
    ca: Path | None = None  # trust gates whose certificate this CA signed (URI SAN in trust_domain)
    trust_domain: str = "cluster.local"
    window: int = 16 << 20  # HTTP/2 flow-control window per stream and per connection, bytes
    max_frame: int = (1 << 24) - 1  # the largest DATA frame we accept (HTTP/2's maximum)


@dataclass(frozen=True)
class PeerSpec:
    """A gate we dial (``address``) and/or accept tunnels from, known by ID, certificate, or CA."""

    name: str
    address: Endpoint | None = None  # None: only accepted from, never dialled
    id: str | None = None  # pinned: base32(sha256(public key)) of its certificate
    cert: Path | None = None  # its (self-signed) certificate: trusted, and its ID pinned
    allow: tuple[Match, ...] = ()  # what it may reach through our h2 listeners; empty: nothing
    # We are behind NAT: keep a connection to this peer open and serve the flows it sends over it
    # (they arrive as listener ``name`` in routes and the access log).
    reverse: bool = False


@dataclass(frozen=True)
class LogSpec:
    level: str = "info"
    access: str = "stderr"  # "stderr", "off", or a file path


@dataclass(frozen=True)
class CaptureSpec:
    """Which traffic the firewall steers to ugate; see tproxy.rules for the rule sets built from it."""

    mode: str  # "tproxy" | "redirect"
    role: str  # "router" (forwarded traffic) | "egress" (this host's outbound) | "ingress" (inbound)
    interfaces: tuple[str, ...] = ()  # router/ingress: capture what arrives on these (empty: any but lo)
    ports: tuple[tuple[int, int], ...] = ()  # destination ports (empty: all)
    exclude: tuple[IPNetwork, ...] = ()  # destinations never captured
    sources: tuple[IPNetwork, ...] = ()  # only these sources (empty: any)
    backend: str = "nftables"  # "nftables" | "iptables"
    apply: str = "manual"  # "auto": apply on start, clear on exit
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
    timeouts: Timeouts = Timeouts()
    log: LogSpec = LogSpec()
    # Processes sharing each listening port through SO_REUSEPORT: one event loop uses one core.
    workers: int = 1
    # SO_MARK on every upstream socket (needs CAP_NET_ADMIN); capture rules skip it so ugate never
    # captures its own traffic. Defaults to 0x2 when capture is configured, else unset.
    mark: int | None = None
    capture: CaptureSpec | None = None
    mesh: MeshSpec | None = None
    peers: tuple[PeerSpec, ...] = ()


class _Problems:
    """Collects located problems so ``ugate check`` can report all of them at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def get(self, raw: Mapping[str, Any], key: str, where: str, conv: Callable[[Any], T], default: T) -> T:
        if key not in raw or raw[key] is None:
            return default
        try:
            return conv(raw[key])
        except (ValueError, TypeError) as e:
            self.add(f"{where}.{key}", str(e))
            return default

    def mapping(self, raw: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.add(where, f"expected a mapping, got {type(raw).__name__}")
            return {}
        for key in raw:
            if key not in allowed:
                self.add(f"{where}.{key}", f"unknown key (expected one of: {', '.join(allowed)})")
        return raw


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{value!r} is not a positive number of seconds")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{value!r} is not a positive integer")
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of: {', '.join(choices)}")
        return str(value)

    return conv


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def _users(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and k for k, v in value.items()
    ):
        raise ValueError("expected a mapping of user name to password (strings)")
    return MappingProxyType(dict(value))


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    nets = []
    for item in _as_list(value):
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(nets)


def _ports(value: Any) -> tuple[tuple[int, int], ...]:
    ranges = []
    for item in _as_list(value):
        lo, _, hi = str(item).partition("-")
        if not lo.strip().isdigit() or not (hi.strip().isdigit() or not hi):
            raise ValueError(f"{item!r} is not a port or a range like 8000-8999")
        low, high = int(lo), int(hi or lo)
        if not 0 < low <= high < 65536:
            raise ValueError(f"{item!r} is not a port or a range like 8000-8999")
        ranges.append((low, high))
    return tuple(ranges)


def _hosts(value: Any) -> tuple[str, ...]:
    hosts = []
    for item in _as_list(value):
        if (not isinstance(item, str) or item.strip(".*") == "" or "*" in item.removeprefix("*.")
                or item.startswith("..")):
            raise ValueError(f"{item!r} is not a host name, *.suffix or .suffix")
        hosts.append(item.lower().rstrip("."))
    return tuple(hosts)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _mark(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32:
        raise ValueError(f"{value!r} is not a firewall mark (1 .. 0xffffffff)")
    return value


def _interfaces(value: Any) -> tuple[str, ...]:
    names = _names(value)
    for name in names:
        if len(name) > 15 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"{name!r} is not an interface name")
    return names


_CAPTURE_KEYS = ("mode", "role", "interfaces", "ports", "exclude", "sources", "backend", "apply", "route_mark",
                 "table")


def _capture(raw: Any, listeners: list[ListenerSpec], p: _Problems) -> CaptureSpec | None:
    if raw is None:
        return None
    w = "capture"
    m = p.mapping(raw, w, _CAPTURE_KEYS)
    mode = p.get(m, "mode", w, _one_of(("tproxy", "redirect")), "tproxy")
    role = p.get(m, "role", w, _one_of(("router", "egress", "ingress")), "router")
    kind_listeners = [spec for spec in listeners if spec.kind == mode]
    port4 = next((s.listen.port for s in kind_listeners if ":" not in s.listen.host), None)
    port6 = next((s.listen.port for s in kind_listeners if ":" in s.listen.host), None)
    udp_listeners = [spec for spec in listeners if spec.kind == "tproxy_udp"]
    udp4 = next((s.listen.port for s in udp_listeners if ":" not in s.listen.host), None)
    udp6 = next((s.listen.port for s in udp_listeners if ":" in s.listen.host), None)
    if port4 is None and port6 is None and udp4 is None and udp6 is None:
        p.add(f"{w}.mode", f"capture mode {mode} needs a listener of kind {mode}")
    if udp_listeners and mode != "tproxy":
        p.add(f"{w}.mode", "tproxy_udp listeners need capture mode tproxy (REDIRECT loses UDP destinations)")
    return CaptureSpec(
        mode=mode,
        role=role,
        interfaces=p.get(m, "interfaces", w, _interfaces, ()),
        ports=p.get(m, "ports", w, _ports, ()),
        exclude=p.get(m, "exclude", w, _networks, ()),
        sources=p.get(m, "sources", w, _networks, ()),
        backend=p.get(m, "backend", w, _one_of(("nftables", "iptables")), "nftables"),
        apply=p.get(m, "apply", w, _one_of(("auto", "manual")), "manual"),
        route_mark=p.get(m, "route_mark", w, _mark, 0x1),
        table=p.get(m, "table", w, _positive_int, 100),
        port4=port4,
        port6=port6,
        udp_port4=udp4,
        udp_port6=udp6,
    )


def _workers(value: Any) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0))
    return _positive_int(value)


def _protocols(value: Any) -> tuple[str, ...]:
    names = _names(value)
    for name in names:
        if name not in PROTOCOLS:
            raise ValueError(f"{name!r} is not one of: {', '.join(PROTOCOLS)}")
    return names


def _names(value: Any) -> tuple[str, ...]:
    return tuple(_string(item) for item in _as_list(value))


_NO_PORTS: tuple[tuple[int, int], ...] = ()
_NO_NETS: tuple[IPNetwork, ...] = ()
_COMMON_KEYS = ("name", "kind", "listen", "max_flows", "relay", "timeouts", "preserve_source", "sniff",
                "sniff_skip_ports", "sniff_skip_dst", "proxy_protocol_from")
_TIMEOUT_KEYS = ("handshake", "connect", "idle", "drain", "sniff")
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "socks5": ("users",),
    "http": ("users", "realm"),
    "forward": ("to",),
    "tproxy": (),
    "redirect": (),
    "tproxy_udp": ("mapping", "session_timeout"),
    "sni": ("port", "default"),
    "mux": ("users", "realm", "tls_port", "ssh", "default"),
    "h2": (),
}


def _timeouts(raw: Any, where: str, base: Timeouts, p: _Problems) -> Timeouts:
    m = p.mapping(raw, where, _TIMEOUT_KEYS)
    return Timeouts(**{k: p.get(m, k, where, _positive_number, getattr(base, k)) for k in _TIMEOUT_KEYS})


def _listener(raw: Any, where: str, base: Timeouts, p: _Problems) -> ListenerSpec | None:
    if not isinstance(raw, Mapping):
        p.add(where, "expected a mapping with name, kind and listen")
        return None
    kind = raw.get("kind")
    if kind not in _KIND_KEYS:
        p.add(f"{where}.kind", f"{kind!r} is not one of: {', '.join(_KIND_KEYS)}")
        return None
    m = p.mapping(raw, where, _COMMON_KEYS + _KIND_KEYS[kind])
    for required in ("name", "listen") + (("to",) if kind == "forward" else ()):
        if required not in m:
            p.add(f"{where}.{required}", "missing")
    common: dict[str, Any] = {
        "name": p.get(m, "name", where, _string, f"<{where}>"),
        "listen": p.get(m, "listen", where, parse_endpoint, Endpoint("127.0.0.1", 1)),
        "timeouts": _timeouts(m.get("timeouts"), f"{where}.timeouts", base, p),
        "max_flows": p.get(m, "max_flows", where, _positive_int, ListenerSpec.max_flows),
        "relay": p.get(m, "relay", where, _one_of(RELAY_MODES), "auto"),
        "preserve_source": p.get(m, "preserve_source", where, _bool, False),
        # Transparent flows are sniffed by default (their names are only in their bytes); a
        # port-forward goes to one place, so it skips the cost unless asked.
        "sniff": p.get(m, "sniff", where, _bool, kind in ("tproxy", "redirect")),
        "sniff_skip_ports": p.get(m, "sniff_skip_ports", where, _ports, _NO_PORTS),
        "sniff_skip_dst": p.get(m, "sniff_skip_dst", where, _networks, _NO_NETS),
        "proxy_protocol_from": p.get(m, "proxy_protocol_from", where, _networks, _NO_NETS),
    }
    if kind == "tproxy":
        return TproxySpec(**common)
    if kind == "redirect":
        return RedirectSpec(**common)
    if kind == "mux":
        return MuxSpec(
            **common,
            users=p.get(m, "users", where, _users, MappingProxyType({})),
            realm=p.get(m, "realm", where, _string, "ugate"),
            tls_port=p.get(m, "tls_port", where, _positive_int, 443),
            ssh=p.get(m, "ssh", where, parse_endpoint, None),
            default=p.get(m, "default", where, parse_endpoint, None),
        )
    if kind == "sni":
        port = p.get(m, "port", where, _positive_int, 443)
        if not port < 65536:
            p.add(f"{where}.port", f"{port} is not a port")
        return SniSpec(**common, port=port, default=p.get(m, "default", where, parse_endpoint, None))
    if kind == "tproxy_udp":
        return TproxyUdpSpec(
            **common,
            mapping=p.get(m, "mapping", where, _one_of(("full-cone", "symmetric")), "full-cone"),
            session_timeout=p.get(m, "session_timeout", where, _positive_number, 60.0),
        )
    if kind == "h2":
        return H2Spec(**common)
    if kind == "socks5":
        return Socks5Spec(**common, users=p.get(m, "users", where, _users, MappingProxyType({})))
    if kind == "http":
        return HttpSpec(
            **common,
            users=p.get(m, "users", where, _users, MappingProxyType({})),
            realm=p.get(m, "realm", where, _string, "ugate"),
        )
    return ForwardSpec(**common, to=p.get(m, "to", where, parse_endpoint, Endpoint("127.0.0.1", 1)))


_MATCH_KEYS = ("listener", "dst", "port", "src", "host", "protocol", "sni", "alpn")
PROTOCOLS = ("tls", "http", "h2c", "ssh", "socks", "stun", "dns", "quic", "dtls", "wireguard", "unknown", "none")
_ROUTE_KEYS = ("name", "match", "action", "upstream", "preserve_source", "proxy_protocol", "via")


def _route(raw: Any, index: int, listeners: set[str], peers: set[str], p: _Problems) -> Route | None:
    where = f"routes[{index}]"
    if not isinstance(raw, Mapping):
        p.add(where, "expected a mapping with match and an action")
        return None
    m = p.mapping(raw, where, _ROUTE_KEYS)
    match = _match(m.get("match"), f"{where}.match", listeners, p)
    upstream = p.get(m, "upstream", where, parse_endpoint, None)
    via = p.get(m, "via", where, _string, None)
    action = p.get(m, "action", where, _one_of(ACTIONS),
                   "upstream" if "upstream" in m else "via" if "via" in m else "")
    if not action:
        if "action" not in m:
            p.add(where, "needs an action (direct, resolve, reject), upstream: host:port, or via: PEER")
    elif action == "upstream" and "upstream" not in m:
        p.add(f"{where}.upstream", "missing (action upstream needs upstream: host:port)")
    elif action != "upstream" and "upstream" in m:
        p.add(f"{where}.upstream", f"not allowed with action {action}")
    elif action == "via" and via is None:
        p.add(f"{where}.via", "missing (action via needs via: PEER)")
    elif action != "via" and "via" in m:
        p.add(f"{where}.via", f"not allowed with action {action}")
    if via is not None and via not in peers:
        p.add(f"{where}.via", f"no peer is named {via!r}" + ("" if peers else " (peers: is empty)"))
    name = p.get(m, "name", where, _string, f"#{index}")
    preserve = p.get(m, "preserve_source", where, _bool, False)
    proxy = p.get(m, "proxy_protocol", where, _one_of(("v1", "v2")), None)
    return Route(index=index, name=name, match=match, action=action, upstream=upstream, preserve_source=preserve,
                 proxy_protocol=proxy, via=via)


def _match(raw: Any, where: str, listeners: set[str], p: _Problems) -> Match:
    mm = p.mapping(raw, where, _MATCH_KEYS)
    w = where
    match = Match(
        listener=p.get(mm, "listener", w, _names, ()),
        dst=p.get(mm, "dst", w, _networks, ()),
        port=p.get(mm, "port", w, _ports, ()),
        src=p.get(mm, "src", w, _networks, ()),
        host=p.get(mm, "host", w, _hosts, ()),
        protocol=p.get(mm, "protocol", w, _protocols, ()),
        sni=p.get(mm, "sni", w, _hosts, ()),
        alpn=p.get(mm, "alpn", w, _names, ()),
    )
    for name in match.listener:
        if name not in listeners:
            p.add(f"{w}.listener", f"no listener is named {name!r}")
    return match


_MESH_KEYS = ("identity", "ca", "trust_domain", "window", "max_frame")
_PEER_KEYS = ("name", "address", "id", "cert", "allow", "reverse")


def _mesh(raw: Any, p: _Problems) -> MeshSpec | None:
    if raw is None:
        return None
    m = p.mapping(raw, "mesh", _MESH_KEYS)
    if "identity" not in m:
        p.add("mesh.identity", "missing (a directory with key.pem and cert.pem: ugate keygen --dir DIR)")
    window = p.get(m, "window", "mesh", _positive_int, MeshSpec.window)
    if not 65535 <= window < 1 << 31:
        p.add("mesh.window", f"{window} is outside 65535 .. 2^31-1")
    max_frame = p.get(m, "max_frame", "mesh", _positive_int, MeshSpec.max_frame)
    if not 1 << 14 <= max_frame < 1 << 24:
        p.add("mesh.max_frame", f"{max_frame} is outside 16384 .. 2^24-1")
    return MeshSpec(identity=Path(p.get(m, "identity", "mesh", _string, ".")),
                    ca=p.get(m, "ca", "mesh", lambda v: Path(_string(v)), None),
                    trust_domain=p.get(m, "trust_domain", "mesh", _string, MeshSpec.trust_domain),
                    window=window, max_frame=max_frame)


def _peers(raw: Any, mesh: MeshSpec | None, listeners: set[str], p: _Problems) -> list[PeerSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        p.add("peers", "expected a list")
        return []
    if mesh is None:
        p.add("peers", "needs a mesh: section (this gate's identity)")
    peers: list[PeerSpec] = []
    for i, item in enumerate(raw):
        where = f"peers[{i}]"
        m = p.mapping(item, where, _PEER_KEYS)
        name = p.get(m, "name", where, _string, f"#{i}")
        if "name" not in m:
            p.add(f"{where}.name", "missing")
        allow_raw = m.get("allow", [])
        if not isinstance(allow_raw, list):
            p.add(f"{where}.allow", "expected a list of matches (as in routes: dst, port, host, ...)")
            allow_raw = []
        peer = PeerSpec(
            name=name,
            address=p.get(m, "address", where, parse_endpoint, None),
            id=p.get(m, "id", where, _string, None),
            cert=p.get(m, "cert", where, lambda v: Path(_string(v)), None),
            allow=tuple(_match(a, f"{where}.allow[{j}]", listeners, p) for j, a in enumerate(allow_raw)),
            reverse=p.get(m, "reverse", where, _bool, False),
        )
        if peer.reverse and peer.address is None:
            p.add(f"{where}.reverse", "needs address: (the gate to keep a connection to)")
        if peer.id is None and peer.cert is None and (mesh is None or mesh.ca is None):
            p.add(where, "needs id: (pinned) or cert:, or a mesh.ca that signs its certificate")
        if any(other.name == name for other in peers):
            p.add(f"{where}.name", f"{name!r} is used twice")
        peers.append(peer)
    return peers


def parse_config(raw: Any) -> GateConfig:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    p = _Problems()
    top = p.mapping(raw, "config", ("listeners", "routes", "timeouts", "log", "workers", "mark", "capture", "mesh",
                                    "peers"))
    workers = p.get(top, "workers", "config", _workers, 1)
    timeouts = _timeouts(top.get("timeouts"), "timeouts", Timeouts(), p)
    lm = p.mapping(top.get("log"), "log", ("level", "access"))
    log = LogSpec(
        level=p.get(lm, "level", "log", _one_of(LOG_LEVELS), "info"),
        access=p.get(lm, "access", "log", _string, "stderr"),
    )
    raw_listeners = top.get("listeners", [])
    # a gate behind NAT may only serve its reverse tunnels: then it needs no listener of its own
    reverse_only = isinstance(top.get("peers"), list) and any(
        isinstance(peer, Mapping) and peer.get("reverse") for peer in top["peers"])
    if not isinstance(raw_listeners, list) or not (raw_listeners or reverse_only):
        p.add("listeners", "expected a non-empty list")
        raw_listeners = []
    listeners: list[ListenerSpec] = []
    for i, item in enumerate(raw_listeners):
        before = len(p.items)
        spec = _listener(item, f"listeners[{i}]", timeouts, p)
        if spec is None or len(p.items) > before:
            continue  # defaults stand in for its bad fields: comparing them would report nonsense
        for other in listeners:
            if other.name == spec.name:
                p.add(f"listeners[{i}].name", f"{spec.name!r} is used twice")
            if other.listen == spec.listen:
                p.add(f"listeners[{i}].listen", f"{spec.listen} is used twice")
        listeners.append(spec)
    raw_routes = top.get("routes", [{"action": "direct"}])
    if not isinstance(raw_routes, list):
        p.add("routes", "expected a list")
        raw_routes = []
    names = {str(item.get("name")) for item in raw_listeners if isinstance(item, Mapping)}
    mesh = _mesh(top.get("mesh"), p)
    peers = _peers(top.get("peers"), mesh, names, p)
    peer_names = {peer.name for peer in peers}
    names |= {peer.name for peer in peers if peer.reverse}  # their flows' listener, for route matches
    routes = [r for i, item in enumerate(raw_routes) if (r := _route(item, i, names, peer_names, p)) is not None]
    if mesh is None and any(isinstance(spec, H2Spec) for spec in listeners):
        p.add("mesh", "missing: an h2 listener needs this gate's identity (mesh: {identity: DIR})")
    capture = _capture(top.get("capture"), listeners, p)
    mark = p.get(top, "mark", "config", _mark, 0x2 if capture else None)
    if capture and mark == capture.route_mark:
        p.add("config.mark", f"must differ from capture.route_mark ({mark:#x})")
    if p.items:
        raise ConfigError(p.items)
    return GateConfig(listeners=tuple(listeners), routes=tuple(routes), timeouts=timeouts, log=log, workers=workers,
                      mark=mark, capture=capture, mesh=mesh, peers=tuple(peers))


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
    return parse_config(raw)
