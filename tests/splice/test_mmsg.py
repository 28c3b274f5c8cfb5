"""Batched datagram relaying: what recvmmsg filled is sent unchanged, in order, to the destination."""

from __future__ import annotations

import socket

import pytest

from splice.mmsg import SOL_UDP, UDP_SEGMENT, DatagramBatch, available, enable_gro, sockaddr

pytestmark = pytest.mark.skipif(not available(), reason="libc without recvmmsg/sendmmsg")


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_batches_relay_datagrams_unchanged(family: int, host: str) -> None:
    relay, sender, receiver = (socket.socket(family, socket.SOCK_DGRAM) for _ in range(3))
    for s in (relay, sender, receiver):
        s.bind((host, 0))
    receiver.settimeout(2)
    datagrams = [bytes([i % 251]) * (1 + 37 * i) for i in range(70)]  # 1 .. 2554 bytes: all fit the buffer
    for d in datagrams:
        sender.sendto(d, relay.getsockname()[:2])
    batch = DatagramBatch(count=32, size=65535)
    relayed = 0
    while n := batch.recv(relay.fileno()):
        assert batch.send(relay.fileno(), n, sockaddr(host, receiver.getsockname()[1])) == n
        relayed += n
    assert relayed == len(datagrams)
    assert [receiver.recv(65535) for _ in datagrams] == datagrams
    assert batch.recv(relay.fileno()) == 0  # nothing left: no exception, no block
    for s in (relay, sender, receiver):
        s.close()


def test_coalesced_datagrams_leave_with_their_original_boundaries() -> None:
    """A sender's UDP_SEGMENT super-datagram reaches a UDP_GRO socket whole on loopback (as GRO delivers
    coalesced datagrams from a NIC); the batch relays it with UDP_SEGMENT, so a receiver that did not ask
    for GRO gets exactly the datagrams that were sent, plain ones in between unchanged."""
    relay, sender, receiver = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3))
    for s in (relay, sender, receiver):
        s.bind(("127.0.0.1", 0))
    if not enable_gro(relay):
        pytest.skip("kernel without UDP_GRO")
    receiver.settimeout(2)
    to_relay = relay.getsockname()
    payload = bytes(range(256)) * 21 + b"tail"  # 5380 bytes: five datagrams of 1000 and one of 380
    sender.setsockopt(SOL_UDP, UDP_SEGMENT, 1000)
    sender.sendto(payload, to_relay)
    sender.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    sender.sendto(b"plain", to_relay)
    sender.setsockopt(SOL_UDP, UDP_SEGMENT, 700)
    sender.sendto(payload[:2100], to_relay)  # three datagrams of exactly 700
    expected = [payload[i:i + 1000] for i in range(0, len(payload), 1000)] + [b"plain"]
    expected += [payload[i:i + 700] for i in range(0, 2100, 700)]

    batch = DatagramBatch(count=8, size=65535, segments=True)
    buffers = datagrams = 0
    while n := batch.recv(relay.fileno()):
        buffers += n
        datagrams += batch.datagrams(n)
        assert batch.send(relay.fileno(), n, sockaddr("127.0.0.1", receiver.getsockname()[1])) == n
    assert (buffers, datagrams) == (3, len(expected))  # three buffers on the way in, ten datagrams out
    assert [receiver.recv(65535) for _ in expected] == expected
    for s in (relay, sender, receiver):
        s.close()
