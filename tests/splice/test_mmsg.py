"""Batched datagram relaying: what recvmmsg filled is sent unchanged, in order, to the destination."""

from __future__ import annotations

import socket

import pytest

from splice.mmsg import DatagramBatch, available, sockaddr

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
