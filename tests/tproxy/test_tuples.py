"""tproxy.tuples on real loopback sockets: sock_diag's exact lookup, and the port choice built on it (the
namespace test test_ingress_sidecar.py::test_source_port_skips_a_tuple_in_use shows the choice matters)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tproxy import tuples
from tproxy.tuples import TCP_LISTEN, bind_apart, local_port_range, tcp_state

TCP_ESTABLISHED = 1


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[int, str, int, int]]:
    """(family, host, listening port, client port) of a connected loopback pair."""
    family, host = request.param
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection((host, port)) as client:
            accepted, _ = listener.accept()
            with accepted:
                yield family, host, port, client.getsockname()[1]


def test_exact_lookup_finds_the_connection_either_way(pair: tuple[int, str, int, int]) -> None:
    family, host, port, client = pair
    assert tcp_state(family, (host, port), (host, client)) == TCP_ESTABLISHED  # the accepted socket
    assert tcp_state(family, (host, client), (host, port)) == TCP_ESTABLISHED  # the client's


def test_no_connection_is_the_listener_or_nothing(pair: tuple[int, str, int, int]) -> None:
    family, host, port, client = pair
    other = client + 1 if client < 65535 else client - 1
    assert tcp_state(family, (host, port), (host, other)) == TCP_LISTEN  # the kernel falls back to it
    with socket.socket(family) as unused:
        unused.bind((host, 0))
        free = unused.getsockname()[1]  # bound, not listening: no socket the lookup can find
    assert tcp_state(family, (host, free), (host, client)) is None


def test_bind_apart_skips_ports_whose_tuple_is_taken(monkeypatch: pytest.MonkeyPatch,
                                                     pair: tuple[int, str, int, int]) -> None:
    family, host, port, _ = pair
    low, high = local_port_range()
    assert 1024 <= low < high <= 65535
    asked: list[int] = []
    taken = 3  # the first picks are "in use": each is skipped, the next one is bound

    def state(fam: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        asked.append(remote[1])
        assert (fam, local, remote[0]) == (family, (host, port), host)
        return TCP_ESTABLISHED if len(asked) <= taken else None

    monkeypatch.setattr(tuples, "tcp_state", state)
    with socket.socket(family) as sock:
        bind_apart(sock, host, (host, port))
        assert sock.getsockname()[1] == asked[-1] and len(asked) > taken  # more if a pick was bound already
        assert all(low <= p <= high for p in asked)


def test_bind_apart_leaves_it_to_the_kernel_when_every_try_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuples, "tcp_state", lambda *_: TCP_ESTABLISHED)
    with socket.socket() as sock:
        bind_apart(sock, "127.0.0.1", ("127.0.0.1", 9))
        assert sock.getsockname()[1] != 0
