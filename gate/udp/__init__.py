"""UDP sessions without sockets: the state every UDP relay shares (tproxy_udp today; SOCKS5 UDP
ASSOCIATE and UDP over the mesh later), driven by datagrams and by the time the shell passes in."""

from gate.udp.sessions import (
    MAX_HELD_BYTES,
    Expired,
    Key,
    Mapping,
    Open,
    Relay,
    SessionTable,
    reply_source,
    session_key,
)

__all__ = [
    "MAX_HELD_BYTES",
    "Expired",
    "Key",
    "Mapping",
    "Open",
    "Relay",
    "SessionTable",
    "reply_source",
    "session_key",
]
