"""A CONNECT-UDP Channel's bounds and credit, driven as a session drives it. The tunnel here is a
stand-in for the session's side of the Tunnel interface whose send window is closed (nothing leaves),
so what the channel holds can be measured; the wire itself is tested in tests/e2e/test_mesh_udp.py."""

from __future__ import annotations

import asyncio

import h2.errors

from gate.mesh.bridge import Bridge
from gate.mesh.capsules import datagram_capsule
from gate.mesh.datagrams import MAX_QUEUED_BYTES, MAX_STREAM_PENDING, Channel, DatagramFlow
from gate.mesh.h2_limits import MAX_PENDING


class ClosedWindow:
    """The session side of Tunnel, with a closed send window: drain sends nothing, unless ended."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pending = 0
        self.acked = 0
        self.resets: list[tuple[int, h2.errors.ErrorCodes]] = []
        self.ended: list[int] = []
        self.forgotten: list[int] = []

    def acknowledge(self, stream_id: int, credit: int) -> None:
        self.acked += credit

    def drain(self, bridge: Bridge) -> None:
        if bridge.eof_pending and not bridge.local_ended:  # as Session.drain once pending is empty
            self.pending -= len(bridge.pending)
            bridge.pending.clear()
            bridge.local_ended = True
            self.ended.append(bridge.stream_id)
            bridge.close_if_done()

    def forget(self, stream_id: int) -> None:
        self.forgotten.append(stream_id)

    def rebalance(self) -> None:
        pass

    def reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        self.resets.append((stream_id, code))


def test_sends_queue_until_answered_and_are_bounded_per_stream_and_per_connection() -> None:
    tunnel = ClosedWindow()
    channel = Channel(tunnel, 1)
    datagram = bytes(1200)
    sent = 0
    while channel.send(datagram):
        sent += 1
    capsule = len(datagram_capsule(datagram))
    assert sent == MAX_STREAM_PENDING // capsule and channel.queued_bytes <= MAX_STREAM_PENDING
    assert channel.dropped == 1 and not channel.pending  # not answered: nothing is sendable yet
    channel.open(lambda payload: None)
    assert len(channel.pending) == sent * capsule and tunnel.pending == sent * capsule
    assert not channel.send(datagram)  # the window is closed: still full
    other = Channel(tunnel, 3)
    other.open(lambda payload: None)
    tunnel.pending = MAX_PENDING - 100  # the connection's other streams hold the read-ahead budget
    assert not other.send(datagram) and other.dropped == 1


def test_early_data_waits_with_its_credit_and_credit_returns_as_capsules_are_consumed() -> None:
    tunnel = ClosedWindow()
    channel = Channel(tunnel, 1)
    wire = datagram_capsule(b"one") + datagram_capsule(b"two")
    channel.deliver(wire[:4], 4)
    channel.deliver(wire[4:], len(wire) - 4)
    assert tunnel.acked == 0  # held: the peer can send one window ahead and no more
    got: list[bytes] = []
    channel.open(got.append)
    assert got == [b"one", b"two"] and tunnel.acked == len(wire)
    channel.deliver(datagram_capsule(b"three"), 9)
    assert got[-1] == b"three" and tunnel.acked == len(wire) + 9


def test_a_bad_capsule_resets_the_stream_with_protocol_error() -> None:
    tunnel = ClosedWindow()
    channel = Channel(tunnel, 5)
    ended: list[str | None] = []
    channel.on_closed = lambda c: ended.append(c.error)
    channel.open(lambda payload: None)
    channel.deliver(b"\x00\x00", 2)  # a DATAGRAM without its context id
    assert tunnel.resets == [(5, h2.errors.ErrorCodes.PROTOCOL_ERROR)] and channel.closed
    assert ended and ended[0] is not None and ended[0].startswith("bad capsule")
    assert tunnel.acked == 2 and 5 in tunnel.forgotten


def test_the_peers_end_of_stream_ends_ours_and_the_channel() -> None:
    tunnel = ClosedWindow()
    channel = Channel(tunnel, 7)
    closed: list[Bridge] = []
    channel.on_closed = closed.append
    channel.open(lambda payload: None)
    channel.remote_end()
    assert tunnel.ended == [7] and closed == [channel] and not channel.send(b"late")


def test_a_datagram_flow_queues_a_bounded_amount_before_its_stream_exists() -> None:
    flow = DatagramFlow()
    datagram = bytes(1000)
    queued = 0
    while flow.send(datagram):
        queued += 1
    assert queued == MAX_QUEUED_BYTES // 1000
    tunnel = ClosedWindow()
    channel = Channel(tunnel, 1)
    channel.open(lambda payload: None)
    flow.attach(channel)
    assert len(channel.pending) == queued * len(datagram_capsule(datagram)) and not flow.queue
    cancelled: list[bool] = []
    later = DatagramFlow()
    later.setup(lambda: cancelled.append(True))
    later.close()
    assert cancelled == [True] and not later.send(b"x")
