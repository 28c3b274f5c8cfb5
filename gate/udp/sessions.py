"""The UDP session table as a state machine: datagrams and the time go in, decisions come out.

It keeps which client sessions are open, holds a session's first datagrams while their QUIC ClientHello
is incomplete, ends sessions the client left idle for ``session_timeout``, and bounds what one client can
make the shell open (sessions per client address, reply sockets per session and per listener); the
shell that owns the sockets routes, relays and logs. Time is an argument (aioquic's ``handle_timer(now)``
model): the table never reads a clock, so every timeout here is tested with plain floats.

One module a little over 400 lines on purpose: the hold, the expiry and the caps share one state (which
key is held, opening or open, and what it holds), and the property test checks them together.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from gate.addr import Endpoint
from gate.deadlines import sweep_interval
from sniff import NeedMore, Sniffed, classify_datagrams

__all__ = [
    "MAX_HELD_BYTES",
    "MAX_REMOTES_PER_SESSION",
    "MAX_REPLY_SOCKETS",
    "MAX_SESSIONS_PER_CLIENT",
    "Counted",
    "Datagram",
    "Expired",
    "Key",
    "Mapping",
    "Open",
    "Refuse",
    "Relay",
    "RemoteVerdict",
    "SessionTable",
    "reply_source",
    "session_key",
]

Mapping = Literal["full-cone", "symmetric"]
MAPPINGS: tuple[Mapping, ...] = ("full-cone", "symmetric")
Key = tuple[Endpoint, Endpoint | None]  # (client, destination), or (client, None) when full-cone
Datagram = tuple[Endpoint, bytes]  # (the destination the client sent to, payload)

# Datagrams held (all sessions) while their QUIC ClientHello is incomplete: Initial keys are public, so
# anyone can craft "incomplete" Initials; past this, new sessions are routed at once without the name.
MAX_HELD_BYTES = 4 << 20
# Reply sockets (one descriptor and up to 4 MiB of buffers each) per session: a full-cone session gets
# one per remote that answers, and any host can answer from 64k ports. ICE gathers from a few STUN/TURN
# servers and a candidate or two per peer, games talk to a handful of servers: 64 leaves them margin.
# At the cap, answers from further remotes are dropped (as a port-restricted NAT would drop them).
MAX_REMOTES_PER_SESSION = 64
# Sessions (open, opening or held) per client address: full-cone makes one per source port, symmetric one
# per destination, so one host could otherwise take all of max_flows (4096 by default) and each session's
# descriptors. 256 is 1/16 of that: a host sending a new DNS query from a new port 4 times a second for
# a whole session_timeout (60 s) still fits. At the cap, the client's datagrams that would open another
# session are dropped before routing, and reported once per client per session_timeout (``Refuse``).
MAX_SESSIONS_PER_CLIENT = 256
# Reply sockets of all the listener's sessions together. The caps above bound one session (64) and one
# address (256 sessions), not the listener: one address could still hold 256 x 64 reply sockets, and a few
# addresses max_flows x 64, far past the 20,000-descriptor limit of the process, starving every other
# listener of descriptors. 4096 (as many as max_flows' default) keeps one listener's worst case at
# max_flows upstream sockets + 4096 reply sockets = 8,192 descriptors, under half the process's limit,
# while a full-cone session still averages one reply socket (most answer from one remote: DNS, QUIC).
# At the budget, answers from a remote the session has no reply socket for are dropped (counted), and
# reported once per session_timeout (the time scale on which sessions end and free their sockets).
MAX_REPLY_SOCKETS = 4096


def session_key(mapping: Mapping, client: Endpoint, dst: Endpoint) -> Key:
    """Full-cone (endpoint-independent) mapping: one session per client, whatever it sends to (what
    STUN, WebRTC and games need); symmetric: one per client and destination."""
    return (client, None) if mapping == "full-cone" else (client, dst)


def reply_source(key: Key, dst: Endpoint, fixed: bool, remote: Endpoint) -> Endpoint | None:
    """The address the client sees an answer from ``remote`` come from, or None: the answer is dropped.

    ``dst`` is where the session's first datagram went. A fixed upstream (a route's ``upstream:``)
    answers as that destination, since the client never heard of the upstream; otherwise the remote
    answers as itself, and with symmetric mapping only the session's destination may answer at all.
    """
    if fixed:
        return dst
    if key[1] is not None and remote != key[1]:
        return None
    return remote


class Counted(Protocol):
    """What the table needs of the shell's session: the bytes the client sent through it (through any
    of its sockets). Only these keep a session open (RFC 4787 REQ-6: a mapping is refreshed by outbound
    traffic): if answers counted, any remote that knows the session's upstream port could keep it, and
    its sockets, open forever. The hot path only adds to the counter; a sweep compares it."""

    @property
    def bytes_up(self) -> int: ...


S = TypeVar("S", bound=Counted)


@dataclass(frozen=True, slots=True)
class Relay(Generic[S]):
    """Send ``payload`` up through the open ``session`` (the client sent it to ``dst``)."""

    session: S
    dst: Endpoint
    payload: bytes


@dataclass(frozen=True, slots=True)
class Open:
    """Route a new session and open its upstream, then relay ``datagrams`` in order; answer the table
    with ``opened`` or ``refused``. ``timed_out``: the sniff wait ended before the hello was whole."""

    key: Key
    client: Endpoint
    dst: Endpoint  # the first datagram's destination: the session's destination for routing and the log
    datagrams: tuple[Datagram, ...]
    sniffed: Sniffed
    timed_out: bool


@dataclass(frozen=True, slots=True)
class Expired(Generic[S]):
    """The client sent nothing through ``session`` for ``session_timeout``: close it (it left the table)."""

    key: Key
    session: S


@dataclass(frozen=True, slots=True)
class Refuse:
    """``client``'s address is at ``max_sessions_per_client``: its datagram to ``dst`` would have opened
    another session and was dropped. Handed out for the first such datagram, then at most once per
    ``session_timeout`` per client address (the time scale on which its sessions end and make room), so
    the shell logs and records a client stuck at its cap, not every datagram it retries; ``refused``
    counts the datagrams dropped since the last ``Refuse`` for this address, this one included."""

    client: Endpoint
    dst: Endpoint
    refused: int


class RemoteVerdict(enum.Enum):
    """Whether a session may open a reply socket for one more remote (``SessionTable.new_remote``)."""

    ADMIT = "admit"  # counted as open: the shell answers ``reply_closed`` if it could not open it
    DROP_FIRST = "drop first"  # at the session's cap, its first drop: the shell logs it, once
    DROP = "drop"  # at a cap again: counted only
    BUDGET_FULL = "budget full"  # at the listener's max_reply_sockets: the shell logs it (at most once
    # per session_timeout; ``budget_refused`` says how many answers were dropped since the last report)
    SHARE_FULL = "share full"  # the client address holds its share of max_reply_sockets (an eighth of the
    # budget is kept for the others); reported like BUDGET_FULL


class _Held:
    """The first datagrams of a session not routed yet (its QUIC ClientHello is incomplete)."""

    __slots__ = ("client", "datagrams", "deadline", "size")

    def __init__(self, client: Endpoint, datagrams: list[Datagram], size: int, deadline: float) -> None:
        self.client = client
        self.datagrams = datagrams
        self.size = size  # payload bytes, counted in the table's held_bytes
        self.deadline = deadline  # route without the name from then on


class _Idle:
    """The client's bytes as last seen by a sweep, when the sweep saw them move; the session's reply
    sockets, and whether they reached their cap (its first dropped answer was reported)."""

    __slots__ = ("capped", "last_active", "replies", "seen")

    def __init__(self, seen: int, now: float) -> None:
        self.seen = seen
        self.last_active = now
        self.replies = 0  # reply sockets admitted and not closed, counted in the table's reply_sockets
        self.capped = False


class _Client:
    """One client address's sessions in the table (any state), and its refusals at the cap."""

    __slots__ = ("next_report", "refused", "replies", "sessions")

    def __init__(self) -> None:
        self.sessions = 0
        self.replies = 0  # reply sockets of its open sessions, at most the table's reply_share
        self.refused = 0  # datagrams dropped at the cap since the last Refuse
        self.next_report = 0.0  # no Refuse before then (0: the next refusal is reported)


def _mapping(text: str) -> Mapping:
    for mapping in MAPPINGS:
        if text == mapping:
            return mapping
    raise ValueError(f"mapping {text!r} is not one of {', '.join(MAPPINGS)}")


class SessionTable(Generic[S]):
    """A listener's UDP sessions, by ``Key``; ``S`` is the shell's session (sockets, flow record).

    A key is in at most one state: held (first datagrams waiting for the rest of a QUIC hello), opening
    (an ``Open`` was handed out and not answered yet; its further datagrams queue), or open (in
    ``sessions``). Call ``timer(now)`` at ``next_timer()``.
    """

    def __init__(self, mapping: str, session_timeout: float, sniff_timeout: float, max_flows: int,
                 max_held_bytes: int = MAX_HELD_BYTES, max_sessions_per_client: int = MAX_SESSIONS_PER_CLIENT,
                 max_remotes_per_session: int = MAX_REMOTES_PER_SESSION,
                 max_reply_sockets: int = MAX_REPLY_SOCKETS) -> None:
        self.mapping = _mapping(mapping)
        self.session_timeout = session_timeout
        self.sniff_timeout = sniff_timeout
        self.max_flows = max_flows  # also the most sessions held at once
        self.max_held_bytes = max_held_bytes
        self.max_sessions_per_client = max_sessions_per_client
        self.max_remotes_per_session = max_remotes_per_session
        self.max_reply_sockets = max_reply_sockets
        self.reply_sockets = 0  # of the open sessions, at most max_reply_sockets
        # of those, what one client address may hold: the rule of max_flows_per_source (the others keep
        # an eighth), so one host's many sessions cannot take every reply socket
        self.reply_share = max_reply_sockets - max_reply_sockets // 8
        self.budget_refused = 0  # answers dropped at max_reply_sockets since the last BUDGET_FULL
        self._next_budget_report = 0.0  # no BUDGET_FULL before then (0: the next drop is reported)
        # datagrams dropped at each cap, by the cap's config key (for the metrics)
        self.dropped: collections.Counter[str] = collections.Counter()
        # open sessions: the shell looks a datagram's session up here itself (its hot path is one
        # dict lookup), and comes to the table only for keys that are not open
        self.sessions: dict[Key, S] = {}
        self.held_bytes = 0  # payload bytes of held and queued datagrams, at most max_held_bytes
        self._held: dict[Key, _Held] = {}  # in deadline order: every hold lasts sniff_timeout
        self._opening: dict[Key, list[Datagram]] = {}
        self._idle: dict[Key, _Idle] = {}
        # client addresses with a key in any state: at most one entry per key, gone with its last key
        self._clients: dict[str, _Client] = {}
        # idle sessions are found by a sweep every interval (late by at most a quarter of the timeout,
        # or 1 s), not by a deadline per session that every datagram would have to move
        self._interval = sweep_interval(session_timeout)
        self._next_sweep: float | None = None

    def key(self, client: Endpoint, dst: Endpoint) -> Key:
        return session_key(self.mapping, client, dst)

    @property
    def held(self) -> dict[Key, tuple[Datagram, ...]]:
        """The datagrams held per key, oldest hold first (a copy, for tests and debugging)."""
        return {key: tuple(held.datagrams) for key, held in self._held.items()}

    # -- inputs ----------------------------------------------------------------------------------

    def datagram(self, client: Endpoint, dst: Endpoint, payload: bytes,
                 now: float) -> Relay[S] | Open | Refuse | None:
        """A datagram from ``client`` to ``dst``. None: nothing to do now (held for the rest of a QUIC
        hello, queued behind an ``Open``, or dropped because the held bytes, or the client's sessions,
        are at their bound)."""
        key = self.key(client, dst)
        session = self.sessions.get(key)
        if session is not None:
            return Relay(session, dst, payload)
        queued = self._opening.get(key)
        if queued is not None:
            if self.held_bytes + len(payload) <= self.max_held_bytes:
                queued.append((dst, payload))
                self.held_bytes += len(payload)
            return None  # else dropped, as a full router queue would
        held = self._held.get(key)
        if held is None:  # a new session of this client address, if it has room for one
            counted = self._clients.get(client.host)
            if counted is None:
                counted = self._clients[client.host] = _Client()
            elif counted.sessions >= self.max_sessions_per_client:
                return self._refuse(counted, client, dst, now)
            counted.sessions += 1
        datagrams = [*held.datagrams, (dst, payload)] if held is not None else [(dst, payload)]
        found = classify_datagrams([data for _, data in datagrams])
        if isinstance(found, NeedMore):
            before = held.size if held is not None else 0
            others = len(self._held) - (held is not None)
            if others < self.max_flows and self.held_bytes + len(payload) <= self.max_held_bytes:
                if held is None:
                    self._held[key] = _Held(client, datagrams, len(payload), now + self.sniff_timeout)
                else:  # keeps its place and deadline: the wait is bounded from the first datagram
                    held.datagrams, held.size = datagrams, before + len(payload)
                self.held_bytes += len(payload)
                return None
            found = Sniffed("quic")  # no room to wait: route on what is known
        if held is not None:
            del self._held[key]
            self.held_bytes -= held.size
        return self._open(key, client, datagrams, found, timed_out=False)

    def timer(self, now: float) -> list[Open | Expired[S]]:
        """Holds past the sniff wait become ``Open`` (without the name); at each sweep, sessions whose
        counters did not move for ``session_timeout`` become ``Expired`` and leave the table."""
        actions: list[Open | Expired[S]] = []
        while self._held:
            key, held = next(iter(self._held.items()))
            if held.deadline > now:
                break
            del self._held[key]
            self.held_bytes -= held.size
            actions.append(self._open(key, held.client, held.datagrams, Sniffed("quic"), timed_out=True))
        if self._next_sweep is not None and now >= self._next_sweep:
            idle = []
            for key, seen in self._idle.items():
                sent = self.sessions[key].bytes_up
                if sent != seen.seen:
                    seen.seen, seen.last_active = sent, now
                elif seen.last_active + self.session_timeout <= now:
                    idle.append(key)
            for key in idle:
                self._release(key, self._idle.pop(key).replies)
                self._forget(key)
                actions.append(Expired(key, self.sessions.pop(key)))
            self._next_sweep = now + self._interval if self.sessions else None
        return actions

    def next_timer(self) -> float | None:
        """When ``timer`` has something to do next (None: nothing held and no session open)."""
        hold = next(iter(self._held.values())).deadline if self._held else None
        if hold is None or (self._next_sweep is not None and self._next_sweep < hold):
            return self._next_sweep
        return hold

    # -- the shell's answers ---------------------------------------------------------------------

    def opened(self, key: Key, session: S, now: float) -> tuple[Datagram, ...]:
        """The ``Open`` for ``key`` succeeded: ``session`` is open from ``now``. Returns the datagrams
        that came meanwhile, to relay after the ``Open``'s own."""
        queued = self._opening.pop(key)
        self.held_bytes -= sum(len(data) for _, data in queued)
        self.sessions[key] = session
        self._idle[key] = _Idle(session.bytes_up, now)
        if self._next_sweep is None:
            self._next_sweep = now + self._interval
        return tuple(queued)

    def refused(self, key: Key) -> None:
        """The ``Open`` for ``key`` was refused (route, loop, limit, no socket): its datagrams are
        dropped, and the client's next datagram asks again (a retrying client shows as retries)."""
        queued = self._opening.pop(key)
        self.held_bytes -= sum(len(data) for _, data in queued)
        self._forget(key)

    def new_remote(self, key: Key, now: float) -> RemoteVerdict:
        """An answer to the open session ``key`` came from a remote it has no reply socket for: may the
        shell open one more? ``ADMIT`` counts it open (for the session and the listener) until the
        session leaves the table or the shell calls ``reply_closed``. At ``max_remotes_per_session`` the
        answer is dropped (counted; the session's first drop says so, for one log line per session); at
        the listener's ``max_reply_sockets`` too (reported the first time, then once per timeout), and at
        the client address's ``reply_share`` of it (reported in the same way)."""
        state = self._idle[key]
        if state.replies >= self.max_remotes_per_session:
            self.dropped["max_remotes_per_session"] += 1
            if state.capped:
                return RemoteVerdict.DROP
            state.capped = True
            return RemoteVerdict.DROP_FIRST
        counted = self._clients[key[0].host]
        if self.reply_sockets >= self.max_reply_sockets or counted.replies >= self.reply_share:
            full = self.reply_sockets >= self.max_reply_sockets
            self.dropped["max_reply_sockets" if full else "reply_share"] += 1
            self.budget_refused += 1
            if now < self._next_budget_report:
                return RemoteVerdict.DROP
            self._next_budget_report = now + self.session_timeout
            return RemoteVerdict.BUDGET_FULL if full else RemoteVerdict.SHARE_FULL
        state.replies += 1
        counted.replies += 1
        self.reply_sockets += 1
        return RemoteVerdict.ADMIT

    def reported(self) -> int:
        """The shell reported a ``BUDGET_FULL``: returns the answers dropped at the budget since the last
        report (this one included), and counts afresh."""
        refused, self.budget_refused = self.budget_refused, 0
        return refused

    def reply_closed(self, key: Key) -> None:
        """An admitted reply socket of the open session ``key`` could not be opened (or was closed while
        the session stays): its place in the budgets is free again."""
        state = self._idle.get(key)
        if state is not None and state.replies:
            state.replies -= 1
            self._release(key, 1)

    def end(self, key: Key) -> S | None:
        """The shell ends an open session itself (an error, say); returns it, or None if not open. Its
        reply sockets leave the budget: the shell closes them with it."""
        state = self._idle.pop(key, None)
        if state is not None:
            self._release(key, state.replies)
        session = self.sessions.pop(key, None)
        if session is not None:
            self._forget(key)
        if not self.sessions:
            self._next_sweep = None
        return session

    def shutdown(self) -> list[S]:
        """Everything ends: held and queued datagrams are dropped (their clients retransmit to whoever
        serves next); returns the open sessions, which have left the table, for the shell to close."""
        sessions = list(self.sessions.values())
        self.sessions.clear()
        self._held.clear()
        self._opening.clear()
        self._idle.clear()
        self._clients.clear()
        self.held_bytes = 0
        self.reply_sockets = 0
        self._next_sweep = None
        return sessions

    def _open(self, key: Key, client: Endpoint, datagrams: list[Datagram], found: Sniffed, timed_out: bool) -> Open:
        self._opening[key] = []
        return Open(key, client, datagrams[0][0], tuple(datagrams), found, timed_out)

    def _refuse(self, counted: _Client, client: Endpoint, dst: Endpoint, now: float) -> Refuse | None:
        self.dropped["max_sessions_per_client"] += 1
        counted.refused += 1
        if now < counted.next_report:
            return None
        refused, counted.refused, counted.next_report = counted.refused, 0, now + self.session_timeout
        return Refuse(client, dst, refused)

    def _release(self, key: Key, replies: int) -> None:
        """``replies`` reply sockets of the open session ``key`` closed (before ``_forget``)."""
        self.reply_sockets -= replies
        self._clients[key[0].host].replies -= replies

    def _forget(self, key: Key) -> None:
        """``key`` left the table (expired, ended or refused): one session less for its client address."""
        host = key[0].host
        counted = self._clients[host]
        counted.sessions -= 1
        if not counted.sessions:
            del self._clients[host]
