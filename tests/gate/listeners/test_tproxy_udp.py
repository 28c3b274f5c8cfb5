"""tproxy_udp's hold of QUIC Initials whose ClientHello continues in later datagrams: bounded by the
bytes held across sessions (Initial keys are public, so anyone can craft "incomplete" hellos)."""

from __future__ import annotations

import asyncio

import pytest

from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.config import parse_config
from gate.context import Context
from gate.listeners import tproxy_udp
from gate.router import Router
from tests.sniff.test_quic import datagrams

SERVER = Endpoint("127.0.0.1", 9)  # the datagrams relayed go to a closed local port, nowhere else


def test_held_bytes_are_bounded_and_released(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, _ = datagrams("chromium_quic_initial.bin")
    monkeypatch.setattr(tproxy_udp, "MAX_HELD_BYTES", len(first) + 100)  # room for one held datagram

    async def scenario() -> None:
        config = parse_config({"listeners": [{"name": "u", "kind": "tproxy_udp", "listen": "0.0.0.0:15002"}]})
        listener = tproxy_udp.TproxyUdpListener(config.listeners[0],  # type: ignore[arg-type]
                                                Context(Router(config.routes), AccessLog("off")))
        a, b = Endpoint("10.0.0.1", 5000), Endpoint("10.0.0.2", 5000)
        listener._first_datagrams((a, None), a, SERVER, first)
        assert list(listener.held) == [(a, None)] and listener.held_bytes == len(first)
        listener._first_datagrams((b, None), b, SERVER, first)  # no room to wait: routed without the name
        assert listener.sessions[(b, None)].flow.sni is None and list(listener.held) == [(a, None)]
        listener._first_datagrams((a, None), a, SERVER, second)  # the hello is whole: routed by its name
        assert listener.sessions[(a, None)].flow.sni == "www.example.test"
        assert not listener.held and listener.held_bytes == 0
        assert dict(listener.ctx.sniff_outcomes) == {"quic": 2}
        await listener.drain(0)

    asyncio.run(scenario())
