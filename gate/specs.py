"""Listener specs: one frozen dataclass per kind that parses and validates its own keys (as mitmproxy's
mode_specs), registered by ``kind``, so adding a kind is one class here and one server in gate.listeners.
The control-plane kinds (browser signaling, the admin API) are in gate.control_specs, which gate.config
imports so that every kind is registered before a config is parsed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from gate.addr import Endpoint, parse_endpoint
from gate.validate import (
    IPNetwork,
    Problems,
    boolean,
    networks,
    one_of,
    port_number,
    ports,
    positive_int,
    positive_number,
    string,
    users,
)
from gate.vocab import RelayMode, Transport, UdpMapping

__all__ = [
    "KINDS",
    "ForwardSpec",
    "H2Spec",
    "HttpSpec",
    "ListenerSpec",
    "MuxSpec",
    "RedirectSpec",
    "SniSpec",
    "Socks5Spec",
    "SocksUdp",
    "Timeouts",
    "TproxySpec",
    "TproxyUdpSpec",
    "listener_clashes",
    "parse_listener",
    "parse_timeouts",
]


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``handshake``: until the client has said where it goes; ``idle``: no byte either way;
    ``drain``: how long flows may finish after SIGTERM before they are cut."""

    handshake: float = 10.0
    connect: float = 10.0
    sniff: float = 0.3  # wait for a flow's first bytes; server-first protocols wait this long, no more
    idle: float = 300.0
    drain: float = 5.0


TIMEOUT_KEYS = ("handshake", "connect", "idle", "drain", "sniff")
COMMON_KEYS = ("name", "kind", "listen", "max_flows", "max_flows_per_source", "max_handshakes_per_source",
               "relay", "timeouts",
               "preserve_source", "sniff", "sniff_skip_ports", "sniff_skip_dst", "proxy_protocol_from")
_NO_USERS: Mapping[str, str] = MappingProxyType({})
_NO_PORTS: tuple[tuple[int, int], ...] = ()
_NO_NETS: tuple[IPNetwork, ...] = ()

KINDS: dict[str, type[ListenerSpec]] = {}  # kind -> spec class, in the order the classes are defined


@dataclass(frozen=True)
class ListenerSpec:
    """What every listener kind has; a subclass names its ``kind``, its own ``KEYS``, and parses them."""

    kind: ClassVar[str] = ""
    KEYS: ClassVar[tuple[str, ...]] = ()  # the kind's own keys, besides COMMON_KEYS
    REQUIRED: ClassVar[tuple[str, ...]] = ()  # own keys without a default
    transport: ClassVar[Transport] = Transport.TCP
    # Transparent flows are sniffed by default (their names are only in their bytes); a port-forward
    # goes to one place, so it skips the cost unless asked.
    SNIFF_DEFAULT: ClassVar[bool] = False

    name: str
    listen: Endpoint
    timeouts: Timeouts
    # Each relayed flow holds 2 sockets (and 2 pipes while data moves); 4096 flows stay far below the
    # 20000-descriptor limits common on these machines, for every listener of a small config together.
    max_flows: int = 4096
    # Open flows (handshakes included) one client address may hold: 0 means max_flows less an eighth
    # (rounded down: no reserve below 8 flows), so one source of slow or idle handshakes can never lock
    # the others out (they keep an eighth), while a sidecar's single app still gets nearly all. Load
    # balancers in proxy_protocol_from are exempt.
    max_flows_per_source: int = 0
    # Of those, connections one client address may hold before its flow is routed (handshakes, sniffing:
    # the phase whose length the client decides). Far above what real clients need at once (a handshake
    # takes milliseconds; a browser opens six per host), far below a listener's share: a source that
    # holds slow handshakes open is cut off early, while its routed flows are not limited by this.
    max_handshakes_per_source: int = 256
    relay: RelayMode = RelayMode.AUTO
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

    @staticmethod
    def parse_listen(text: Any) -> Endpoint:
        """The ``listen`` value (a kind may accept more than host:port)."""
        return parse_endpoint(text)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            KINDS[cls.kind] = cls

    @classmethod
    def parse(cls, m: Mapping[str, Any], where: str, common: dict[str, Any], p: Problems) -> ListenerSpec:
        """The spec from the common fields (already parsed) and this kind's own keys in ``m``."""
        return cls(**common, **cls.options(m, where, p))

    @classmethod
    def options(cls, m: Mapping[str, Any], where: str, p: Problems) -> dict[str, Any]:
        """This kind's own fields, parsed from ``m`` (problems located under ``where``)."""
        return {}

    @property
    def source_limit(self) -> int:
        """Open flows one client address may hold (see max_flows_per_source)."""
        return self.max_flows_per_source or self.max_flows - self.max_flows // 8

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
class SocksUdp:
    """SOCKS5 UDP ASSOCIATE on a ``socks5`` or ``mux`` listener (the ``udp:`` mapping) and its bounds."""

    KEYS: ClassVar[tuple[str, ...]] = ("enabled", "session_timeout", "max_destinations",
                                       "max_associations_per_client", "max_sessions", "max_datagram")
    enabled: bool = True  # false: UDP ASSOCIATE is answered "command not supported"
    # A destination's upstream socket closes after this long without a datagram from the client to it
    # (answers do not keep it: RFC 4787 REQ-6, and so no remote can hold our sockets open).
    session_timeout: float = 60.0
    # Destinations (one upstream socket each) per association: a DNS resolver behind SOCKS talks to a
    # few servers, a QUIC or WebRTC client to a handful; past it the client's datagrams to further
    # destinations are dropped (counted) until one expires.
    max_destinations: int = 64
    # Associations (a control connection, a relay socket, up to max_destinations upstream sockets) one
    # client address may hold: a client needs one per UDP socket it proxies; further ones are refused.
    max_associations_per_client: int = 16
    # Upstream sockets of all the listener's associations together: the bounds above are per client,
    # and max_flows x max_destinations (262,144) would be far past the process's 20,000 descriptors.
    # 4096 (max_flows' default) keeps the worst case under half of them, as tproxy_udp's reply budget.
    max_sessions: int = 4096
    # The largest payload relayed either way: 65,507 is the most an IPv4 datagram carries; answers
    # whose wrapped form would not fit are dropped (counted), as are larger client datagrams.
    max_datagram: int = 65507


_UDP_DEFAULT = SocksUdp()


def socks_udp(raw: Any, where: str, p: Problems) -> SocksUdp:
    """The ``udp:`` mapping of a socks5 or mux listener."""
    m = p.mapping(raw, where, SocksUdp.KEYS)
    d = _UDP_DEFAULT
    return SocksUdp(
        enabled=p.get(m, "enabled", where, boolean, d.enabled),
        session_timeout=p.get(m, "session_timeout", where, positive_number, d.session_timeout),
        max_destinations=p.get(m, "max_destinations", where, positive_int, d.max_destinations),
        max_associations_per_client=p.get(m, "max_associations_per_client", where, positive_int,
                                          d.max_associations_per_client),
        max_sessions=p.get(m, "max_sessions", where, positive_int, d.max_sessions),
        max_datagram=p.get(m, "max_datagram", where, _datagram_size, d.max_datagram))


def _datagram_size(value: Any) -> int:
    size = positive_int(value)
    if size > 65507:
        raise ValueError(f"{size} is more than an IPv4 datagram carries (65507)")
    return size


@dataclass(frozen=True)
class Socks5Spec(ListenerSpec):
    """SOCKS5 (and SOCKS4/4a, which has no authentication and is refused when users are set)."""

    kind: ClassVar[str] = "socks5"
    KEYS: ClassVar[tuple[str, ...]] = ("users", "udp")
    users: Mapping[str, str] = field(default_factory=lambda: _NO_USERS)
    udp: SocksUdp = _UDP_DEFAULT

    @classmethod
    def options(cls, m: Mapping[str, Any], where: str, p: Problems) -> dict[str, Any]:
        return {"users": p.get(m, "users", where, users, _NO_USERS),
                "udp": socks_udp(m.get("udp"), f"{where}.udp", p)}


@dataclass(frozen=True)
class HttpSpec(ListenerSpec):
    """HTTP proxy: CONNECT tunnels and absolute-URI forwarding."""

    kind: ClassVar[str] = "http"
    KEYS: ClassVar[tuple[str, ...]] = ("users", "realm")
    users: Mapping[str, str] = field(default_factory=lambda: _NO_USERS)
    realm: str = "ugate"

    @classmethod
    def options(cls, m: Mapping[str, Any], where: str, p: Problems) -> dict[str, Any]:
        return {"users": p.get(m, "users", where, users, _NO_USERS),
                "realm": p.get(m, "realm", where, string, "ugate")}


@dataclass(frozen=True, kw_only=True)
class ForwardSpec(ListenerSpec):
    """Fixed port-forward: every flow's requested destination is ``to``."""

    kind: ClassVar[str] = "forward"
    KEYS: ClassVar[tuple[str, ...]] = ("to",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("to",)
    to: Endpoint

    @classmethod
    def options(cls, m: Mapping[str, Any], where: str, p: Problems) -> dict[str, Any]:
        return {"to": p.get(m, "to", where, parse_endpoint, Endpoint("127.0.0.1", 1))}


@dataclass(frozen=True)
class TproxySpec(ListenerSpec):
    """Transparent TCP (TPROXY): the accepted socket's local address is the original destination."""

    kind: ClassVar[str] = "tproxy"
    SNIFF_DEFAULT: ClassVar[bool] = True


@dataclass(frozen=True)
class RedirectSpec(ListenerSpec):
    """REDIRECTed TCP: the original destination comes from conntrack (SO_ORIGINAL_DST)."""

    kind: ClassVar[str] = "redirect"
    SNIFF_DEFAULT: ClassVar[bool] = True


@dataclass(frozen=True)
class TproxyUdpSpec(ListenerSpec):
    """Transparent UDP (TPROXY): per-client sessions; replies leave from the server's address."""

    kind: ClassVar[str] = "tproxy_udp"
    KEYS: ClassVar[tuple[str, ...]] = ("mapping", "session_timeout", "max_sessions_per_client",
                                       "max_remotes_per_session", "max_reply_sockets")
    transport: ClassVar[Transport] = Transport.UDP
    mapping: UdpMapping = UdpMapping.FULL_CONE
    session_timeout: float = 60.0  # a UDP session the client sent nothing through for this long ends
    # Why these defaults: gate.udp.sessions (MAX_SESSIONS_PER_CLIENT, MAX_REMOTES_PER_SESSION,
    # MAX_REPLY_SOCKETS).
    max_sessions_per_client: int = 256  # per client address: further new sessions are refused
    max_remotes_per_session: int = 64  # reply sockets: answers from further remotes are dropped
    max_reply_sockets: int = 4096  # of all sessions together: answers needing one more are dropped

    @classmethod
    def options(cls, m: Mapping[str, Any], where: str, p: Problems) -> dict[str, Any]:
        return {"mapping": p.get(m, "mapping", where, one_of(UdpMapping), UdpMapping.FULL_CONE),
                "session_timeout": p.get(m, "session_timeout", where, positive_number, 60.0),
                "max_sessions_per_client": p.get(m, "max_sessions_per_client", where, positive_int, 256),
                "max_remotes_per_session": p.get(m, "max_remotes_per_session", where, positive_int, 64),
                "max_reply_sockets": p.get(m, "max_reply_sockets", where, positive_int, 4096)}


@dataclass(frozen=True)
class SniSpec(ListenerSpec):
    """SNI ingress: TLS is routed by its server name, never terminated."""

    kind: ClassVar[str] = "sni"
    KEYS: ClassVar[tuple[str, ...]] = ("port", "default")
    port: int = 443  # the destination is SNI:port unless a route names an upstream
    default: Endpoint | None = None  # where flows without TLS or SNI go; None: they are closed

    @classmethod
    def options(cls, m: Mapping[str, Any], where: str, p: Problems) -> dict[str, Any]:
        return {"port": p.get(m, "port", where, port_number, 443),
                "default": p.get(m, "default", where, parse_endpoint, None)}


@dataclass(frozen=True)
class MuxSpec(HttpSpec):
    """One port for SOCKS5/4a, the HTTP proxy, TLS by SNI and SSH: whichever the client speaks."""

    kind: ClassVar[str] = "mux"
    KEYS: ClassVar[tuple[str, ...]] = (*HttpSpec.KEYS, "tls_port", "ssh", "default", "udp")
    tls_port: int = 443  # TLS goes to <SNI>:<tls_port> unless a route names an upstream
    ssh: Endpoint | None = None  # where SSH goes; None: SSH is closed
    default: Endpoint | None = None  # anything else (or TLS without SNI); None: closed
    udp: SocksUdp = _UDP_DEFAULT  # SOCKS5 UDP ASSOCIATE, as on a socks5 listener

    @classmethod
    def options(cls, m: Mapping[str, Any], where: str, p: Problems) -> dict[str, Any]:
        return {**super().options(m, where, p),
                "udp": socks_udp(m.get("udp"), f"{where}.udp", p),
                "tls_port": p.get(m, "tls_port", where, port_number, 443),
                "ssh": p.get(m, "ssh", where, parse_endpoint, None),
                "default": p.get(m, "default", where, parse_endpoint, None)}


@dataclass(frozen=True)
class H2Spec(ListenerSpec):
    """Mesh tunnels from peer gates: TLS 1.3 with client certificates, one HTTP/2 CONNECT stream per flow."""

    kind: ClassVar[str] = "h2"


@dataclass(frozen=True)
class StunSpec(ListenerSpec):
    """STUN server: answers Binding requests (a public gate as its NATed peers' STUN server)."""

    kind: ClassVar[str] = "stun"
    transport: ClassVar[Transport] = Transport.UDP


def parse_timeouts(raw: Any, where: str, base: Timeouts, p: Problems) -> Timeouts:
    m = p.mapping(raw, where, TIMEOUT_KEYS)
    return Timeouts(**{k: p.get(m, k, where, positive_number, getattr(base, k)) for k in TIMEOUT_KEYS})


def parse_listener(raw: Any, where: str, base: Timeouts, p: Problems) -> ListenerSpec | None:
    """One ``listeners[]`` item: the common keys here, the kind's own in its class."""
    if not isinstance(raw, Mapping):
        p.add(where, "expected a mapping with name, kind and listen")
        return None
    cls = KINDS.get(raw.get("kind"))  # type: ignore[arg-type]  # (any YAML value; a miss is reported)
    if cls is None:
        p.add(f"{where}.kind", f"{raw.get('kind')!r} is not one of: {', '.join(KINDS)}")
        return None
    m = p.mapping(raw, where, COMMON_KEYS + cls.KEYS)
    for required in ("name", "listen", *cls.REQUIRED):
        if required not in m:
            p.add(f"{where}.{required}", "missing")
    common: dict[str, Any] = {
        "name": p.get(m, "name", where, string, f"<{where}>"),
        "listen": p.get(m, "listen", where, cls.parse_listen, Endpoint("127.0.0.1", 1)),
        "timeouts": parse_timeouts(m.get("timeouts"), f"{where}.timeouts", base, p),
        "max_flows": p.get(m, "max_flows", where, positive_int, ListenerSpec.max_flows),
        "max_flows_per_source": p.get(m, "max_flows_per_source", where, positive_int, 0),
        "max_handshakes_per_source": p.get(m, "max_handshakes_per_source", where, positive_int,
                                           ListenerSpec.max_handshakes_per_source),
        "relay": p.get(m, "relay", where, one_of(RelayMode), RelayMode.AUTO),
        "preserve_source": p.get(m, "preserve_source", where, boolean, False),
        "sniff": p.get(m, "sniff", where, boolean, cls.SNIFF_DEFAULT),
        "sniff_skip_ports": p.get(m, "sniff_skip_ports", where, ports, _NO_PORTS),
        "sniff_skip_dst": p.get(m, "sniff_skip_dst", where, networks, _NO_NETS),
        "proxy_protocol_from": p.get(m, "proxy_protocol_from", where, networks, _NO_NETS),
    }
    return cls.parse(m, where, common, p)


def _wildcard(host: str) -> int | None:
    """4 or 6 when ``host`` is that family's any-address (0.0.0.0, ::), else None."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return address.version if address.is_unspecified else None


def _family(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def listener_clashes(a: ListenerSpec, b: ListenerSpec) -> str | None:
    """Why ``a`` and ``b`` cannot both bind, or None.

    They clash on the same port and transport when the addresses are equal, or when one is its family's
    wildcard (0.0.0.0:P takes P on every IPv4 address, so 127.0.0.1:P fails to bind, or, with
    SO_REUSEPORT workers, silently shares the port). TCP and UDP never clash; IPv6 listeners are v6-only
    (bind_listening_socket), so [::]:P and 0.0.0.0:P do not either.
    """
    if a.transport != b.transport or a.listen.port != b.listen.port:
        return None
    if a.listen.host == b.listen.host:
        return f"{a.listen} is used twice"
    for wild, other in ((a, b), (b, a)):
        family = _wildcard(wild.listen.host)
        if family is not None and _family(other.listen.host) == family:
            return (f"{a.listen} overlaps {b.listen} of listener {b.name!r} ({wild.listen.host} takes port "
                    f"{a.listen.port} on every IPv{family} address)")
    return None
