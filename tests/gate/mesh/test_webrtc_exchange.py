"""The HTTP/2 exchange that carries WebRTC signaling reads at most MAX_BODY bytes of a body."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gate.errors import ClientProtocolError
from gate.mesh.h2_exchange import MAX_BODY, _read_all


def _read(body: bytes) -> bytes:
    async def scenario() -> bytes:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            writer = loop.create_task(loop.sock_sendall(theirs, body))
            writer.add_done_callback(lambda _t: theirs.shutdown(socket.SHUT_WR))
            return await _read_all(ours, MAX_BODY)
        finally:
            writer.cancel()
            ours.close()
            theirs.close()

    return asyncio.run(scenario())


def test_a_body_up_to_the_bound_is_read_whole() -> None:
    assert _read(b"x" * MAX_BODY) == b"x" * MAX_BODY


def test_a_body_past_the_bound_is_refused() -> None:
    with pytest.raises(ClientProtocolError, match=f"exchange body over {MAX_BODY} bytes"):
        _read(b"x" * (4 * MAX_BODY))
