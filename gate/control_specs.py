"""Specs of the control-plane listener kinds, which answer HTTP requests under a bearer token or an
address allow list: ``webrtc_signal`` (browser peers' signaling, gate.mesh.webrtc.browser) and ``admin``
(metrics and the admin API, gate.admin); and the one way their tokens are read. Registered with the other
kinds by gate.specs, which imports this module last.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from gate.addr import Endpoint, parse_endpoint
from gate.specs import ListenerSpec
from gate.validate import IPNetwork, Problems, networks, one_of, positive_int, positive_number, string

__all__ = ["MIN_TOKEN", "AdminAuth", "AdminSpec", "WebrtcSignalSpec", "read_token"]


@dataclass(frozen=True)
class WebrtcSignalSpec(ListenerSpec):
    """Signaling for browser peers: a POSTed WebRTC offer is answered, and the browser's data channels
    (labelled ``tcp:HOST:PORT``) are TCP flows through this gate's routes (gate.mesh.webrtc.browser).
    Never open by default: a token (Authorization: Bearer) or a source allow list is required."""

    kind: ClassVar[str] = "webrtc_signal"
    KEYS: ClassVar[tuple[str, ...]] = ("path", "token_file", "token_env", "allow_from", "origins", "max_offer",
                                       "max_peers", "max_peers_per_source", "ice_timeout", "peer_idle")
    path: str = "/offer"
    token: str = field(default="", repr=False)  # read from token_file or token_env at load (never logged)
    allow_from: tuple[IPNetwork, ...] = ()  # signaling clients allowed by address (with a token: both needed)
    # Page origins allowed to POST from a browser (CORS); "*" for any. An Origin not listed is refused,
    # so with an allow list alone a page on another site cannot use a browser inside the allowed range.
    origins: tuple[str, ...] = ()
    max_offer: int = 16 << 10  # bytes of an offer body: a browser's offer with its candidates is 1-3 KB
    max_peers: int = 64  # browser peer connections at once (each holds UDP sockets and an SCTP association)
    max_peers_per_source: int = 4  # of those, per signaling client address (a page needs one)
    ice_timeout: float = 10.0  # seconds after the answer for ICE and DTLS to connect, or the connection is closed
    peer_idle: float = 60.0  # seconds a connection may stay without an open channel before it is closed

    @classmethod
    def options(cls, m: Mapping[str, Any], where: str, p: Problems) -> dict[str, Any]:
        token = ""
        if "token_file" in m and "token_env" in m:
            p.add(f"{where}.token_file", "give token_file or token_env, not both")
        elif "token_file" in m:
            token = p.get(m, "token_file", where, _token_file, "")
        elif "token_env" in m:
            token = p.get(m, "token_env", where, _token_env, "")
        allow_from = p.get(m, "allow_from", where, networks, _NO_NETS)
        if not token and not allow_from:
            p.add(where, "browser peers need token_file, token_env or allow_from (never open by default)")
        path = p.get(m, "path", where, string, "/offer")
        if not path.startswith("/"):
            p.add(f"{where}.path", f"{path!r} does not start with /")
        return {"path": path, "token": token, "allow_from": allow_from,
                "origins": p.get(m, "origins", where, _origins, _NO_ORIGINS),
                "max_offer": p.get(m, "max_offer", where, positive_int, 16 << 10),
                "max_peers": p.get(m, "max_peers", where, positive_int, 64),
                "max_peers_per_source": p.get(m, "max_peers_per_source", where, positive_int, 4),
                "ice_timeout": p.get(m, "ice_timeout", where, positive_number, 10.0),
                "peer_idle": p.get(m, "peer_idle", where, positive_number, 60.0)}


_NO_ORIGINS: tuple[str, ...] = ()
_NO_NETS: tuple[IPNetwork, ...] = ()
# characters: a bearer token is guessable below this (a page or an admin port may be probed at will); it is
# all that guards the admin API over TCP
MIN_TOKEN = 16


def read_token(token_file: str | None, token_env: str | None) -> str:
    """A bearer token: the first line of ``token_file``, or the value of ``token_env``; ValueError says
    why there is none (unreadable, unset, too short)."""
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                text, source = f.readline(4096), token_file
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {token_file}: {getattr(e, 'strerror', None) or e}") from None
    elif token_env is not None:
        if token_env not in os.environ:
            raise ValueError(f"environment variable {token_env} is not set")
        text, source = os.environ[token_env], f"${token_env}"
    else:
        raise ValueError("no token_file or token_env")
    token = text.strip()
    if len(token) < MIN_TOKEN or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{source}: the token must have at least {MIN_TOKEN} characters (printable, no spaces)")
    return token


def _token_file(value: Any) -> str:
    return read_token(string(value), None)


def _token_env(value: Any) -> str:
    return read_token(None, string(value))


def _origins(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str) or not (item == "*" or item.startswith(("http://", "https://"))):
            raise ValueError(f"{item!r} is not an origin (scheme://host[:port]) or *")
    return tuple(item.rstrip("/") for item in items)


class AdminAuth(StrEnum):
    TOKEN = "token"  # Authorization: Bearer <token> on every request
    NONE = "none"  # nobody is asked: only on a loopback address or a unix socket (its file mode guards it)


@dataclass(frozen=True)
class AdminSpec(ListenerSpec):
    """The admin API and Prometheus metrics (gate.admin): loopback TCP with a bearer token, or a unix
    socket (``listen: /path``, mode 0600, guarded by its permissions). Never part of a default config."""

    kind: ClassVar[str] = "admin"
    KEYS: ClassVar[tuple[str, ...]] = ("auth", "token_file", "token_env")
    auth: AdminAuth = AdminAuth.TOKEN
    token_file: str | None = None  # the token is the file's first line (read at start, and by ugate check)
    token_env: str | None = None  # or the value of this environment variable

    @property
    def unix_path(self) -> str | None:
        """The unix socket path, when ``listen`` named one (kept as an Endpoint with port 0)."""
        return self.listen.host if self.listen.port == 0 else None

    @staticmethod
    def parse_listen(text: Any) -> Endpoint:
        if isinstance(text, str) and text.startswith("/"):
            if len(text.encode()) > 107:  # sun_path holds 108 bytes with the terminating NUL
                raise ValueError(f"{text!r}: a unix socket path is at most 107 bytes")
            return Endpoint(text, 0)
        return parse_endpoint(text)

    @classmethod
    def parse(cls, m: Mapping[str, Any], where: str, common: dict[str, Any], p: Problems) -> ListenerSpec:
        listen: Endpoint = common["listen"]
        unix = listen.port == 0
        token_file = p.get(m, "token_file", where, string, None)
        token_env = p.get(m, "token_env", where, string, None)
        # a unix socket is guarded by its file mode alone, unless a token is given too
        plain = unix and token_file is None and token_env is None
        auth = p.get(m, "auth", where, one_of(AdminAuth), AdminAuth.NONE if plain else AdminAuth.TOKEN)
        if token_file is not None and token_env is not None:
            p.add(f"{where}.token_env", "give token_file or token_env, not both")
        if auth == AdminAuth.TOKEN and token_file is None and token_env is None:
            p.add(f"{where}.auth", "a TCP admin listener needs token_file or token_env (or auth: none, on "
                                   "loopback only)" if not unix else "auth: token needs token_file or token_env")
        if auth == AdminAuth.NONE and not unix and not _is_loopback(listen.host):
            p.add(f"{where}.auth", f"none is only allowed on a loopback address or a unix socket, not {listen.host}")
        return cls(**common, auth=auth, token_file=token_file, token_env=token_env)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
