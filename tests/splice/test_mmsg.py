"""Batched datagram relaying: what recvmmsg filled is sent unchanged, in order, to the destination."""

from __future__ import annotations

import socket

import pytest

from splice.mmsg import SOL_UDP, UDP_SEGMENT, DatagramBatch, address, available, enable_gro, sockaddr

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


def _relay_all(batch: DatagramBatch, relay: socket.socket, dest: bytes) -> int:
    relayed = 0
    while n := batch.recv(relay.fileno()):
        assert batch.send(relay.fileno(), n, dest, coalesce=True) == n
        relayed += n
    return relayed


def test_equal_sized_datagrams_leave_coalesced_with_their_boundaries() -> None:
    """Runs of equal-sized datagrams (a shorter one ends a run; an empty one stands alone) leave as one
    segmented send each: a receiver with UDP_GRO gets them as few buffers (so they were coalesced), and
    cutting those at the segment size gives back exactly the datagrams, as a plain receiver gets them."""
    relay, sender, plain, gro = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4))
    for s in (relay, sender, plain, gro):
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
    if not enable_gro(gro):
        pytest.skip("kernel without UDP_GRO")
    datagrams = [bytes([i]) * 1000 for i in range(40)] + [b"short", b""] + [bytes([i]) * 700 for i in range(5)]
    datagrams += [bytes([7]) * 1200] * 3 + [bytes([8]) * 1300]  # a longer one starts a run of its own
    batch = DatagramBatch(count=64, size=65535, segments=True)
    for receiver in (plain, gro):
        for d in datagrams:
            sender.sendto(d, relay.getsockname())
        assert _relay_all(batch, relay, sockaddr("127.0.0.1", receiver.getsockname()[1])) == len(datagrams)
    assert [plain.recv(65535) for _ in datagrams] == datagrams
    received: list[bytes] = []
    buffers = 0
    while len(received) < len(datagrams):
        data, ancdata, _, _ = gro.recvmsg(65535, socket.CMSG_SPACE(4))
        buffers += 1
        size = next((int.from_bytes(d[:2], "little") for level, kind, d in ancdata if level == SOL_UDP), 0)
        received += [data[i:i + size] for i in range(0, len(data), size)] if size else [data]
    assert received == datagrams
    assert buffers <= 6  # 1000 x 40 + short, empty, 700 x 5, 1200 x 3, 1300: six runs
    for s in (relay, sender, plain, gro):
        s.close()


_SMALL_MTU_RELAY = r"""
import socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
from splice.mmsg import DatagramBatch, sockaddr
subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1280"], check=True)
relay, sender, receiver = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3))
for s in (relay, sender, receiver):
    s.bind(("127.0.0.1", 0))
receiver.settimeout(2)
datagrams = [bytes([i]) * 1400 for i in range(10)]  # over the MTU: fragmented one by one, never segmented
for d in datagrams:
    sender.sendto(d, relay.getsockname())
batch = DatagramBatch(count=16, size=65535, segments=True)
n = batch.recv(relay.fileno())
assert batch.send(relay.fileno(), n, sockaddr("127.0.0.1", receiver.getsockname()[1]), coalesce=True) == n == 10
assert batch.gso_refused
assert [receiver.recv(65535) for _ in datagrams] == datagrams
print("ok")
"""


def test_a_path_that_refuses_segmentation_gets_the_datagrams_one_by_one() -> None:
    """Segments over the route's MTU make the kernel refuse a segmented send (EINVAL): the batch sends the
    same datagrams again, one each (the kernel fragments them), and says so for the caller to stop
    coalescing. Run in a network namespace of its own (unshare), where loopback's MTU is 1280."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(["unshare", "-n", sys.executable, "-c", _SMALL_MTU_RELAY, root], capture_output=True,
                          text=True, timeout=30)
    assert done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_a_batch_with_sources_sends_each_remotes_run_to_its_own_socket(family: int, host: str) -> None:
    """Datagrams from two remotes, interleaved in runs: each keeps its source, and ``start`` sends one
    run at a time, coalesced, to that remote's receiver."""
    relay, one, two = (socket.socket(family, socket.SOCK_DGRAM) for _ in range(3))
    to_one, to_two = (socket.socket(family, socket.SOCK_DGRAM) for _ in range(2))
    for s in (relay, one, two, to_one, to_two):
        s.bind((host, 0))
        s.settimeout(2)
    order = [(one, 5), (two, 3), (one, 1), (two, 4)]
    for k, (sender, count) in enumerate(order):
        for i in range(count):
            sender.sendto(b"%d.%d" % (k, i) * 100, relay.getsockname()[:2])
    batch = DatagramBatch(count=32, size=65535, segments=True, sources=True)
    n = batch.recv(relay.fileno())
    assert n == 13
    receiver_of = {one.getsockname()[:2]: to_one, two.getsockname()[:2]: to_two}
    i = 0
    while i < n:
        source, j = batch.source(i), i + 1
        while j < n and batch.source(j) == source:
            j += 1
        target = receiver_of[address(source)]
        assert batch.send(relay.fileno(), j, sockaddr(host, target.getsockname()[1]), coalesce=True, start=i) == j - i
        i = j

    def sent_in(runs: tuple[int, int]) -> list[bytes]:
        return [b"%d.%d" % (k, i) * 100 for k in runs for i in range(order[k][1])]
    assert [to_one.recv(65535) for _ in range(6)] == sent_in((0, 2))
    assert [to_two.recv(65535) for _ in range(7)] == sent_in((1, 3))
    for s in (relay, one, two, to_one, to_two):
        s.close()
