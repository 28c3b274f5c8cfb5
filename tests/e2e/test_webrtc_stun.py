"""WebRTC's server-reflexive candidates come from the STUN servers in mesh.stun, such as another gate's
`stun` listener, and from nowhere else (aiortc's default public server is never asked)."""

from __future__ import annotations

import asyncio
from typing import Any

from gate.addr import Endpoint
from gate.mesh.webrtc.link import new_peer_connection
from tests.conftest import free_port


async def offer_sdp(stun: tuple[Endpoint, ...]) -> str:
    pc = new_peer_connection(stun)
    try:
        pc.createDataChannel("probe")
        await pc.setLocalDescription(await pc.createOffer())  # gathers the candidates
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


def test_a_gates_stun_listener_gives_server_reflexive_candidates(start_gate: Any) -> None:
    port = free_port()
    gate = start_gate([{"name": "stun", "kind": "stun", "listen": f"127.0.0.1:{port}"}])
    with_stun = asyncio.run(offer_sdp((Endpoint("127.0.0.1", port),)))
    assert "typ srflx" in with_stun, with_stun
    assert "typ srflx" not in asyncio.run(offer_sdp(()))  # none configured: host candidates only
    assert gate.stop() == 0
    assert "stun: 0 Binding requests" not in gate.stderr()
