"""The UDP session table without sockets or a loop: time is a plain float, datagrams are captured bytes
(dig's query, Chromium's and aioquic's QUIC Initials, whose ClientHello spans several datagrams)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.addr import Endpoint
from gate.udp import Expired, Open, Relay, SessionTable, reply_source, session_key
from gate.udp.sessions import (
    MAX_REMOTES_PER_SESSION,
    MAX_REPLY_SOCKETS,
    MAX_SESSIONS_PER_CLIENT,
    Refuse,
    RemoteVerdict,
)
from sniff import Sniffed
from tests.fuzzing import budget
from tests.sniff.test_quic import datagrams

DNS_QUERY = (Path(__file__).parents[2] / "sniff" / "fixtures" / "dig_query.bin").read_bytes()
CHROMIUM = datagrams("chromium_quic_initial.bin")  # the hello is whole after the second datagram
AIOQUIC_SPLIT = datagrams("aioquic_initial_split.bin")
A, B = Endpoint("10.0.0.1", 5000), Endpoint("10.0.0.2", 5000)
DNS, QUIC, OTHER = Endpoint("192.0.2.53", 53), Endpoint("192.0.2.1", 443), Endpoint("192.0.2.2", 443)
TIMEOUT, SNIFF = 60.0, 0.5


class Session:
    """A shell's session as the table sees it: byte counters that move while datagrams pass."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes_up = 0  # what the client sent
        self.bytes_down = 0  # answers, and whatever else remotes sent to the session's upstream port


def table(mapping: str = "full-cone", max_flows: int = 100, max_held_bytes: int = 1 << 20,
          max_sessions_per_client: int = MAX_SESSIONS_PER_CLIENT,
          max_remotes_per_session: int = MAX_REMOTES_PER_SESSION,
          max_reply_sockets: int = MAX_REPLY_SOCKETS) -> SessionTable[Session]:
    return SessionTable(mapping, TIMEOUT, SNIFF, max_flows, max_held_bytes, max_sessions_per_client,
                        max_remotes_per_session, max_reply_sockets)


def open_session(t: SessionTable[Session], client: Endpoint, dst: Endpoint, now: float) -> Session:
    action = t.datagram(client, dst, DNS_QUERY, now)
    assert isinstance(action, Open)
    session = Session(f"{client}>{dst}")
    assert t.opened(action.key, session, now) == ()
    return session


def run_timers(t: SessionTable[Session], until: float) -> list[tuple[float, Open | Expired[Session]]]:
    """What a shell's loop timer would see: timer(now) called at each next_timer() up to ``until``."""
    seen = []
    while (when := t.next_timer()) is not None and when <= until:
        seen += [(when, action) for action in t.timer(when)]
    return seen


# -- mapping -----------------------------------------------------------------------------------------


def test_full_cone_is_one_session_per_client_symmetric_one_per_destination() -> None:
    assert session_key("full-cone", A, DNS) == session_key("full-cone", A, QUIC) == (A, None)
    assert session_key("symmetric", A, DNS) == (A, DNS) != session_key("symmetric", A, QUIC)

    cone = table("full-cone")
    session = open_session(cone, A, DNS, 0.0)
    assert cone.datagram(A, QUIC, b"x", 1.0) == Relay(session, QUIC, b"x")  # the same session, its own dst
    assert isinstance(cone.datagram(B, DNS, DNS_QUERY, 1.0), Open)  # another client: another session

    symmetric = table("symmetric")
    session = open_session(symmetric, A, DNS, 0.0)
    assert symmetric.datagram(A, DNS, b"x", 1.0) == Relay(session, DNS, b"x")
    opened = symmetric.datagram(A, OTHER, DNS_QUERY, 1.0)
    assert isinstance(opened, Open) and opened.key == (A, OTHER) and opened.dst == OTHER


def test_unknown_mapping_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="restricted"):
        SessionTable("restricted", TIMEOUT, SNIFF, 10)


def test_who_may_answer() -> None:
    remote = Endpoint("198.51.100.7", 3478)
    # full-cone: anyone the client's session sent to (or not) answers as itself
    assert reply_source((A, None), DNS, False, remote) == remote
    # symmetric: only the session's destination
    assert reply_source((A, DNS), DNS, False, DNS) == DNS
    assert reply_source((A, DNS), DNS, False, remote) is None
    # a fixed upstream answers as the destination the client sent to, whatever the mapping
    assert reply_source((A, DNS), DNS, True, Endpoint("203.0.113.9", 53)) == DNS
    assert reply_source((A, None), DNS, True, Endpoint("203.0.113.9", 53)) == DNS


# -- opening -----------------------------------------------------------------------------------------


def test_first_datagram_is_classified_and_opens() -> None:
    t = table()
    action = t.datagram(A, DNS, DNS_QUERY, 3.0)
    assert action == Open((A, None), A, DNS, ((DNS, DNS_QUERY),), action.sniffed, timed_out=False)
    assert action.sniffed.protocol == "dns" and action.sniffed.host == "www.example.test"
    assert t.sessions == {} and t.next_timer() is None  # not open until the shell says so


def test_datagrams_during_opening_queue_and_come_back_from_opened() -> None:
    t = table()
    action = t.datagram(A, DNS, DNS_QUERY, 0.0)
    assert isinstance(action, Open)
    assert t.datagram(A, QUIC, b"late", 0.1) is None
    assert t.held_bytes == 4
    session = Session("s")
    assert t.opened(action.key, session, 0.2) == ((QUIC, b"late"),)
    assert t.held_bytes == 0 and t.sessions == {(A, None): session}


def test_refused_drops_the_queue_and_the_next_datagram_asks_again() -> None:
    t = table()
    action = t.datagram(A, DNS, DNS_QUERY, 0.0)
    assert isinstance(action, Open)
    assert t.datagram(A, DNS, b"retry", 0.1) is None
    t.refused(action.key)
    assert t.held_bytes == 0 and t.sessions == {}
    assert isinstance(t.datagram(A, DNS, DNS_QUERY, 1.0), Open)


# -- idle expiry -------------------------------------------------------------------------------------


def test_idle_session_expires_at_the_timeout_not_before() -> None:
    t = table()
    session = open_session(t, A, DNS, 100.0)
    before = run_timers(t, 100.0 + TIMEOUT - 0.001)
    assert before == [] and t.sessions == {(A, None): session}
    assert run_timers(t, 100.0 + TIMEOUT) == [(100.0 + TIMEOUT, Expired((A, None), session))]
    assert t.sessions == {} and t.next_timer() is None  # nothing left to wake up for


def test_the_clients_datagrams_postpone_expiry() -> None:
    t = table()
    session = open_session(t, A, DNS, 0.0)
    assert run_timers(t, 30.0) == []
    session.bytes_up += 100  # the client sent, noticed by the next sweep (at most 1 s later)
    assert run_timers(t, 30.0 + TIMEOUT) == []
    assert run_timers(t, 31.0 + TIMEOUT) == [(31.0 + TIMEOUT, Expired((A, None), session))]


def test_answers_and_unsolicited_datagrams_do_not_postpone_expiry() -> None:
    """RFC 4787 REQ-6: only outbound traffic refreshes a mapping; a remote that keeps writing to the
    session's upstream port must not keep its sockets open forever."""
    t = table()
    session = open_session(t, A, DNS, 0.0)
    for second in range(1, int(TIMEOUT)):
        session.bytes_down += 1200
        assert run_timers(t, float(second)) == []
    assert run_timers(t, TIMEOUT) == [(TIMEOUT, Expired((A, None), session))]


def test_sweeps_are_coarse_and_stop_with_the_last_session() -> None:
    t = table()
    open_session(t, A, DNS, 0.0)
    assert t.next_timer() == 1.0  # a quarter of the timeout, at most 1 s: no timer per datagram
    assert t.timer(0.5) == [] and t.next_timer() == 1.0
    assert t.end((A, None)) is not None and t.next_timer() is None
    assert t.end((A, None)) is None


# -- caps ------------------------------------------------------------------------------------------------


def test_sessions_per_client_address_are_capped_and_refusals_reported_once_per_timeout() -> None:
    t = table(max_sessions_per_client=2)  # full-cone: a session per source port of the address
    first = open_session(t, Endpoint("10.0.0.1", 1), DNS, 0.0)
    open_session(t, Endpoint("10.0.0.1", 2), DNS, 0.0)
    third, fourth = Endpoint("10.0.0.1", 3), Endpoint("10.0.0.1", 4)
    assert t.datagram(third, DNS, DNS_QUERY, 10.0) == Refuse(third, DNS, 1)  # the first: reported
    assert t.datagram(fourth, QUIC, DNS_QUERY, 11.0) is None  # counted, not reported again yet
    assert t.datagram(third, DNS, CHROMIUM[0], 12.0) is None  # nor held: a hold is a session too
    assert t.held == {} and t.held_bytes == 0 and t.dropped == {"max_sessions_per_client": 3}
    assert isinstance(t.datagram(B, DNS, DNS_QUERY, 12.0), Open)  # other addresses are not affected
    assert t.datagram(third, DNS, DNS_QUERY, 10.0 + TIMEOUT) == Refuse(third, DNS, 3)  # a timeout later
    assert run_timers(t, 30.0) == []
    first.bytes_up += 1  # keeps the first open; the second idles out and leaves room for one
    expired = [action for _, action in run_timers(t, 70.0)]
    assert [action.key for action in expired if isinstance(action, Expired)] == [(Endpoint("10.0.0.1", 2), None)]
    assert isinstance(t.datagram(fourth, DNS, DNS_QUERY, 70.0), Open)


def test_symmetric_sessions_per_client_are_capped_across_destinations() -> None:
    t = table("symmetric", max_sessions_per_client=2)
    open_session(t, A, DNS, 0.0)
    assert t.datagram(A, QUIC, CHROMIUM[0], 0.0) is None  # held, and counted
    assert t.datagram(A, OTHER, DNS_QUERY, 0.0) == Refuse(A, OTHER, 1)
    assert t.datagram(A, DNS, b"x", 0.0) == Relay(t.sessions[(A, DNS)], DNS, b"x")  # open ones go on
    [(_, opened)] = run_timers(t, SNIFF)  # the hold becomes an Open: still the same slot
    assert isinstance(opened, Open)
    t.refused(opened.key)  # the route said no: its slot is free again
    assert isinstance(t.datagram(A, OTHER, DNS_QUERY, 1.0), Open)


def test_ended_sessions_free_their_clients_slot() -> None:
    t = table(max_sessions_per_client=1)
    open_session(t, A, DNS, 0.0)
    assert isinstance(t.datagram(Endpoint(A.host, 6000), DNS, DNS_QUERY, 0.0), Refuse)
    assert t.end((A, None)) is not None
    assert isinstance(t.datagram(Endpoint(A.host, 6000), DNS, DNS_QUERY, 0.0), Open)
    t.shutdown()
    assert isinstance(t.datagram(A, DNS, DNS_QUERY, 0.0), Open)


def test_reply_sockets_per_session_are_capped_and_the_first_drop_reported() -> None:
    t = table(max_remotes_per_session=2)
    open_session(t, A, DNS, 0.0)
    open_session(t, B, DNS, 0.0)
    assert t.new_remote((A, None), 0.0) is RemoteVerdict.ADMIT
    assert t.new_remote((A, None), 0.0) is RemoteVerdict.ADMIT
    assert t.new_remote((A, None), 0.0) is RemoteVerdict.DROP_FIRST  # one log line for the session
    assert t.new_remote((A, None), 0.0) is RemoteVerdict.DROP
    assert t.new_remote((B, None), 0.0) is RemoteVerdict.ADMIT  # another session has its own cap
    t.reply_closed((A, None))  # the shell could not open one: the session has room again
    assert t.new_remote((A, None), 0.0) is RemoteVerdict.ADMIT
    assert t.new_remote((A, None), 0.0) is RemoteVerdict.DROP
    assert t.dropped == {"max_remotes_per_session": 3} and t.reply_sockets == 3


def test_reply_sockets_of_the_listener_are_budgeted_and_drops_reported_once_per_timeout() -> None:
    t = table(max_remotes_per_session=2, max_reply_sockets=3)
    open_session(t, A, DNS, 0.0)
    open_session(t, B, DNS, 0.0)
    assert [t.new_remote((A, None), 1.0) for _ in range(2)] == [RemoteVerdict.ADMIT] * 2
    assert t.new_remote((B, None), 1.0) is RemoteVerdict.ADMIT
    assert t.reply_sockets == 3
    assert t.new_remote((B, None), 2.0) is RemoteVerdict.BUDGET_FULL  # the first: reported
    assert t.new_remote((B, None), 3.0) is RemoteVerdict.DROP  # counted, not reported again yet
    assert t.new_remote((A, None), 3.0) is RemoteVerdict.DROP_FIRST  # A is at its own cap first
    assert t.new_remote((B, None), 2.0 + TIMEOUT - 1) is RemoteVerdict.DROP
    assert t.reported() == 3 and t.reported() == 0  # since the last report, then afresh
    assert t.new_remote((B, None), 2.0 + TIMEOUT) is RemoteVerdict.BUDGET_FULL  # a timeout later
    assert t.reported() == 1
    assert t.dropped == {"max_reply_sockets": 4, "max_remotes_per_session": 1} and t.reply_sockets == 3


def test_one_client_address_holds_at_most_its_share_of_the_reply_sockets() -> None:
    """Sessions of one host (any port) share one budget: seven eighths of the listener's, so one host
    answering from many remotes cannot take every reply socket (the rule of max_flows_per_source)."""
    t = table(max_remotes_per_session=10, max_reply_sockets=16)
    other_port = Endpoint(A.host, 5001)
    for client in (A, other_port, B):
        open_session(t, client, DNS, 0.0)
    assert t.reply_share == 14
    admitted = [t.new_remote((client, None), 0.0) for client in (A, other_port) for _ in range(8)]
    assert admitted == [RemoteVerdict.ADMIT] * 14 + [RemoteVerdict.SHARE_FULL, RemoteVerdict.DROP]
    assert [t.new_remote((B, None), 0.0) for _ in range(2)] == [RemoteVerdict.ADMIT] * 2  # the others' eighth
    assert t.dropped == {"reply_share": 2} and t.reply_sockets == 16
    t.reply_closed((A, None))  # one of the host's sockets closes: room for one more, not two
    assert t.new_remote((other_port, None), 0.0) is RemoteVerdict.ADMIT
    assert t.end((other_port, None)) is not None  # its session's sockets leave the host's count with it
    assert [t.new_remote((A, None), 0.0) for _ in range(3)] == [RemoteVerdict.ADMIT] * 3


def test_reply_sockets_of_sessions_that_end_are_free_again() -> None:
    t = table(max_remotes_per_session=4, max_reply_sockets=4)
    a = open_session(t, A, DNS, 0.0)
    open_session(t, B, DNS, 0.0)
    assert [t.new_remote((B, None), 0.0) for _ in range(4)] == [RemoteVerdict.ADMIT] * 4
    assert t.new_remote((A, None), 0.0) is RemoteVerdict.BUDGET_FULL
    assert run_timers(t, 30.0) == []
    a.bytes_up += 1  # A stays; B idles out, and its four sockets leave the budget with it
    [expired] = [action for _, action in run_timers(t, TIMEOUT + 1)]
    assert isinstance(expired, Expired) and expired.key == (B, None) and t.reply_sockets == 0
    assert [t.new_remote((A, None), TIMEOUT + 1) for _ in range(4)] == [RemoteVerdict.ADMIT] * 4
    assert t.end((A, None)) is a and t.reply_sockets == 0  # ended by the shell: freed too
    open_session(t, A, DNS, 100.0)
    assert t.new_remote((A, None), 100.0) is RemoteVerdict.ADMIT
    t.shutdown()
    assert t.reply_sockets == 0


# -- the QUIC hold -----------------------------------------------------------------------------------


def test_quic_hello_over_two_datagrams_is_held_then_released_in_order_with_its_name() -> None:
    t = table()
    assert t.datagram(A, QUIC, CHROMIUM[0], 0.0) is None
    assert t.held == {(A, None): ((QUIC, CHROMIUM[0]),)} and t.held_bytes == len(CHROMIUM[0])
    assert t.next_timer() == SNIFF
    action = t.datagram(A, QUIC, CHROMIUM[1], 0.1)
    assert isinstance(action, Open) and not action.timed_out
    assert action.datagrams == ((QUIC, CHROMIUM[0]), (QUIC, CHROMIUM[1]))
    assert action.sniffed.sni == "www.example.test" and action.sniffed.alpn == ("h3",)
    assert t.held == {} and t.held_bytes == 0
    assert run_timers(t, 10.0) == []  # the hold's deadline is gone with it


def test_hold_ends_after_the_sniff_wait_without_the_name() -> None:
    t = table()
    assert t.datagram(A, QUIC, AIOQUIC_SPLIT[0], 0.0) is None
    assert t.datagram(A, QUIC, AIOQUIC_SPLIT[0], 0.4) is None  # a retransmission: still incomplete
    assert t.next_timer() == SNIFF  # bounded from the first datagram, not moved by later ones
    assert t.timer(SNIFF - 0.001) == []
    [action] = t.timer(SNIFF)
    assert action == Open((A, None), A, QUIC, ((QUIC, AIOQUIC_SPLIT[0]), (QUIC, AIOQUIC_SPLIT[0])),
                          Sniffed("quic"), timed_out=True)
    assert t.held == {} and t.held_bytes == 0


def test_holds_end_in_the_order_they_began() -> None:
    t = table()
    assert t.datagram(A, QUIC, AIOQUIC_SPLIT[0], 0.0) is None
    assert t.datagram(B, QUIC, AIOQUIC_SPLIT[0], 0.2) is None
    assert t.datagram(A, QUIC, AIOQUIC_SPLIT[0], 0.3) is None  # adds to A's hold, which stays first
    fired = run_timers(t, 1.0)
    assert [(when, action.key) for when, action in fired] == [(SNIFF, (A, None)), (0.2 + SNIFF, (B, None))]


def test_held_bytes_are_bounded_across_sessions() -> None:
    t = table(max_held_bytes=len(CHROMIUM[0]) + 100)  # room for one held datagram
    assert t.datagram(A, QUIC, CHROMIUM[0], 0.0) is None
    action = t.datagram(B, QUIC, CHROMIUM[0], 0.0)  # no room to wait: routed at once, without the name
    assert action == Open((B, None), B, QUIC, ((QUIC, CHROMIUM[0]),), Sniffed("quic"), timed_out=False)
    assert list(t.held) == [(A, None)] and t.held_bytes == len(CHROMIUM[0])
    action = t.datagram(A, QUIC, CHROMIUM[1], 0.1)  # the hello is whole: routed by its name
    assert isinstance(action, Open) and action.sniffed.sni == "www.example.test"
    assert t.held == {} and t.held_bytes == 0


def test_a_hold_that_outgrows_the_bound_is_released_without_the_name() -> None:
    t = table(max_held_bytes=len(AIOQUIC_SPLIT[0]) + 100)
    assert t.datagram(A, QUIC, AIOQUIC_SPLIT[0], 0.0) is None
    action = t.datagram(A, QUIC, AIOQUIC_SPLIT[0], 0.1)
    assert isinstance(action, Open) and action.sniffed == Sniffed("quic") and len(action.datagrams) == 2
    assert t.held == {} and t.held_bytes == 0


def test_max_flows_bounds_the_sessions_held() -> None:
    t = table(max_flows=1)
    assert t.datagram(A, QUIC, CHROMIUM[0], 0.0) is None
    action = t.datagram(B, QUIC, CHROMIUM[0], 0.0)
    assert isinstance(action, Open) and action.sniffed == Sniffed("quic")
    assert t.datagram(A, QUIC, CHROMIUM[0], 0.1) is None  # the one hold may still grow


def test_shutdown_drops_holds_and_returns_the_open_sessions() -> None:
    t = table()
    session = open_session(t, A, DNS, 0.0)
    assert t.datagram(B, QUIC, CHROMIUM[0], 0.0) is None
    assert t.shutdown() == [session]
    assert t.sessions == {} and t.held == {} and t.held_bytes == 0 and t.next_timer() is None


# -- properties ----------------------------------------------------------------------------------------

PAYLOADS = [DNS_QUERY, CHROMIUM[0], CHROMIUM[1], CHROMIUM[2], AIOQUIC_SPLIT[0], b"\x00", b""]
CLIENTS = [A, B, Endpoint("10.0.0.3", 7), Endpoint(A.host, 5001)]  # two ports of one host
DSTS = [DNS, QUIC]
step = st.one_of(
    st.tuples(st.just("datagram"), st.sampled_from(CLIENTS), st.sampled_from(DSTS), st.sampled_from(PAYLOADS)),
    st.tuples(st.just("wait"), st.floats(0, 2)),
    st.tuples(st.just("answer"), st.booleans()),
    st.tuples(st.just("activity"), st.integers(0, 2)),
    st.tuples(st.just("remote"), st.integers(0, 2), st.integers(0, 3)),
    st.tuples(st.just("end"), st.sampled_from(CLIENTS)),
)


@budget(300)
@given(mapping=st.sampled_from(["full-cone", "symmetric"]), max_flows=st.integers(1, 3),
       max_held=st.sampled_from([1300, 2600, 1 << 20]), per_client=st.integers(1, 4),
       reply_budget=st.sampled_from([1, 2, 3, 4, 8, 9]), steps=st.lists(step, max_size=40))
def test_held_bytes_stay_accounted(mapping: str, max_flows: int, max_held: int, per_client: int,
                                   reply_budget: int, steps: list[tuple]) -> None:
    """Whatever arrives and whenever: held bytes are exactly those of held and queued datagrams, within
    their bound; a key is in one state at most; every datagram is held, queued, relayed, opened or
    dropped only when the bytes (or the client address's sessions) are at their bound; each address has
    at most its cap of keys, and the table's count of them is exact; timers only fire when due; reply
    sockets are admitted exactly while their session, their client address and the listener are below
    their caps, and the listener's count is that of its open sessions."""
    remotes = 2 if reply_budget < 8 else 4  # with the larger budgets, one host can reach its share
    t: SessionTable[Session] = SessionTable(mapping, 4.0, SNIFF, max_flows, max_held, per_client, remotes,
                                            reply_budget)
    now, pending, replies = 0.0, [], collections.Counter[object]()
    for kind, *args in steps:
        actions: list[Open | Expired[Session] | Relay[Session] | Refuse | None] = []
        if kind == "datagram":
            client, dst, payload = args
            before, refused = t.held_bytes, t.dropped["max_sessions_per_client"]
            action = t.datagram(client, dst, payload, now)
            if action is None or isinstance(action, Refuse):
                grew = t.held_bytes - before == len(payload)
                at_cap = t.dropped["max_sessions_per_client"] == refused + 1
                assert grew or at_cap or before + len(payload) > max_held  # dropped only at a bound
            actions.append(action)
        elif kind == "wait":
            now += args[0]
            due = t.next_timer()
            actions += t.timer(now)
            assert actions == [] or (due is not None and due <= now)
        elif kind == "answer" and pending:
            key = pending.pop(0)
            if args[0]:
                t.opened(key, Session(str(key)), now)
            else:
                t.refused(key)
        elif kind == "activity" and t.sessions:
            sessions = list(t.sessions.values())
            sessions[args[0] % len(sessions)].bytes_up += 1
        elif kind == "remote" and t.sessions:
            key = list(t.sessions)[args[0] % len(t.sessions)]
            if args[1] == 3:  # the shell could not open an admitted one
                t.reply_closed(key)
                replies[key] -= replies[key] > 0
            else:
                host = sum(n for k, n in replies.items() if k[0].host == key[0].host)
                room = replies[key] < remotes and replies.total() < reply_budget and host < t.reply_share
                assert (t.new_remote(key, now) is RemoteVerdict.ADMIT) == room
                replies[key] += room
        elif kind == "end":
            for key in [key for key in t.sessions if key[0] == args[0]]:
                assert t.end(key) is not None
        pending += [action.key for action in actions if isinstance(action, Open)]
        for key in [key for key in replies if key not in t.sessions]:  # expired or ended: closed
            del replies[key]
        assert t.reply_sockets == replies.total() <= reply_budget
        held = t.held
        queued = t._opening  # the queues are private: no shell needs to read them
        assert t.held_bytes == sum(len(p) for ds in held.values() for _, p in ds) + sum(
            len(p) for ds in queued.values() for _, p in ds)
        assert 0 <= t.held_bytes <= max_held and len(held) <= max_flows
        assert not (held.keys() & queued.keys()) and not (held.keys() & t.sessions.keys())
        assert not (queued.keys() & t.sessions.keys()) and set(queued) == set(pending)
        assert all(t.key(key[0], ds[0][0]) == key for key, ds in held.items())
        hosts = collections.Counter(key[0].host for key in (*held, *queued, *t.sessions))
        assert {host: c.sessions for host, c in t._clients.items()} == hosts
        assert all(n <= per_client for n in hosts.values())
    t.shutdown()
    assert t.held_bytes == 0 and t.next_timer() is None
