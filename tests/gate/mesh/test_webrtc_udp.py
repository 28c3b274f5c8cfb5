"""UDP flows' data channels in one process, with real aiortc peer connections (the harness of
test_webrtc_link: WebrtcMesh offering, Answerer serving): the channel's parameters as the serving side
sees them, the label's UDP marker, refusals, the bounds (datagram size, aiortc's queue, what is held
before the upstream is open, channels shared with TCP flows), and a lost connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.addr import Endpoint
from gate.config import PeerSpec
from gate.errors import ClientProtocolError, GateError, RejectedByRule, UpstreamUnreachable
from gate.flow import Close
from gate.mesh.transport import Datagrams, DatagramStream, FlowMeta, Stream, StreamEnd
from gate.mesh.webrtc import link as link_module
from gate.mesh.webrtc.dialer import WebrtcMesh
from gate.mesh.webrtc.link import Link, TransportDown
from gate.mesh.webrtc.udp import MAX_BUFFERED, MAX_DATAGRAM, MAX_EARLY, ChannelDatagramStream, DatagramChannel
from gate.mesh.webrtc.wire import label_of, parse_label
from tests.fuzzing import budget
from tests.gate.mesh.test_webrtc_link import Served, _close, _flow, _pair

DST = Endpoint("127.0.0.1", 5353)
META = FlowMeta(DST, Endpoint("127.0.0.1", 40000), protocol="dns", hops=1)


class ServedUdp(Served):
    """Serves UDP channels as gate.mesh.inbound would, with an echo in place of the upstream socket
    (``hold``: left unaccepted; ``refuse``: refused with that error)."""

    def __init__(self, hold: bool = False, refuse: GateError | None = None) -> None:
        super().__init__(0, hold)
        self.refusal = refuse
        self.udp: list[ChannelDatagramStream] = []
        self.tunnels: list[Datagrams] = []

    def __call__(self, ident: str, peer: PeerSpec | None, meta: FlowMeta | GateError,
                 stream: Stream | DatagramStream) -> Callable[[str], None]:
        if not isinstance(stream, ChannelDatagramStream):
            return super().__call__(ident, peer, meta, stream)  # type: ignore[arg-type]
        self.udp.append(stream)
        self.metas.append(meta)
        if self.refusal is not None:
            stream.refuse(self.refusal)
        elif not self.hold:
            self.accept(stream)
        return self.abandoned.append

    def accept(self, stream: ChannelDatagramStream) -> None:
        """Echo each datagram (those held before, too: they are delivered as it is accepted)."""
        tunnel = stream.accept_datagrams(lambda payload: stream.datagrams.send(b"echo:" + payload), self.ends.append)
        assert tunnel is not None
        self.tunnels.append(tunnel)


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_the_label_marks_a_udp_flow_and_round_trips() -> None:
    assert parse_label(label_of(META, udp=True)) == (META, True)
    assert parse_label(label_of(META)) == (META, False)
    assert '"connect-udp"' in label_of(META, udp=True)


_UDP_LABEL = label_of(META, udp=True)


@budget(300)
@given(st.one_of(st.integers(0, len(_UDP_LABEL)).map(lambda n: _UDP_LABEL[:n]),
                 st.tuples(st.integers(0, len(_UDP_LABEL)), st.text(max_size=40)).map(
                     lambda c: _UDP_LABEL[:c[0]] + c[1] + _UDP_LABEL[c[0]:])))
def test_fuzz_udp_labels_are_a_flow_and_its_kind_or_a_protocol_error(label: str) -> None:
    """Every truncation of a UDP label, and text inserted anywhere in one."""
    try:
        meta, udp = parse_label(label)
        assert isinstance(meta, FlowMeta) and isinstance(udp, bool)
    except ClientProtocolError:
        pass


async def _open(mesh: WebrtcMesh, answers: list[bytes], ends: list[GateError | None],
                meta: FlowMeta = META) -> DatagramChannel:
    loop = asyncio.get_running_loop()
    tunnel = await mesh.open_datagrams("b", meta, answers.append, ends.append, loop.time() + 10)
    assert isinstance(tunnel, DatagramChannel)
    return tunnel


def test_the_serving_side_sees_an_unordered_channel_without_retransmissions() -> None:
    async def scenario() -> None:
        served = ServedUdp()
        mesh = _pair(served)
        answers: list[bytes] = []
        ends: list[GateError | None] = []
        tunnel = await _open(mesh, answers, ends)
        for i in range(50):
            assert tunnel.send(b"%d" % i)
        await until(lambda: len(answers) == 50)
        assert sorted(answers) == sorted(b"echo:%d" % i for i in range(50))
        serving = served.udp[0].datagrams.channel
        assert (serving.ordered, serving.maxRetransmits, serving.maxPacketLifeTime) == (False, 0, None)
        assert served.metas == [META]
        tunnel.close()  # our end: the far side ends cleanly, and ours says nothing
        await until(lambda: bool(served.ends))
        assert served.ends[0].close == Close.EOF and served.ends[0].bytes_in == sum(len(b"%d" % i) for i in range(50))
        assert not ends
        link = mesh.state["b"].link
        assert link is not None and not link.bridges
        await _close(mesh)

    asyncio.run(scenario())


def test_a_refusal_reaches_the_dialling_side_as_its_error() -> None:
    async def scenario() -> None:
        mesh = _pair(ServedUdp(refuse=RejectedByRule("peer a may not reach 127.0.0.1:5353")))
        ends: list[GateError | None] = []
        tunnel = await _open(mesh, [], ends)
        tunnel.send(b"query")
        await until(lambda: bool(ends))
        assert isinstance(ends[0], RejectedByRule) and "403" in str(ends[0])
        assert tunnel.closed and not tunnel.send(b"again")
        await _close(mesh)

    asyncio.run(scenario())


def test_a_message_over_the_largest_udp_payload_is_dropped_and_counted() -> None:
    async def scenario() -> None:
        served = ServedUdp()
        mesh = _pair(served)
        answers: list[bytes] = []
        tunnel = await _open(mesh, answers, [])
        assert not tunnel.send(bytes(MAX_DATAGRAM + 1)) and tunnel.dropped["too_big"] == 1  # not sent
        tunnel.channel.send(bytes(MAX_DATAGRAM + 9))  # past our check: the far side drops it
        assert tunnel.send(bytes(MAX_DATAGRAM - 5))  # the largest that is echoed whole
        await until(lambda: bool(answers))
        assert answers == [b"echo:" + bytes(MAX_DATAGRAM - 5)]
        assert served.udp[0].datagrams.dropped["too_big"] == 1
        await _close(mesh)

    asyncio.run(scenario())


def test_datagrams_past_aiortcs_queue_bound_are_dropped() -> None:
    async def scenario() -> None:
        mesh = _pair(ServedUdp())
        tunnel = await _open(mesh, [], [])
        sent = sum(tunnel.send(bytes(1200)) for _ in range(1000))  # no yield: aiortc sends none meanwhile
        assert sent == MAX_BUFFERED // 1200 and tunnel.dropped["queue_full"] == 1000 - sent
        assert tunnel.channel.bufferedAmount <= MAX_BUFFERED
        await until(lambda: tunnel.channel.bufferedAmount == 0)
        assert tunnel.send(bytes(1200))  # the queue drained: sending again
        await _close(mesh)

    asyncio.run(scenario())


def test_what_arrives_before_the_upstream_is_open_is_held_up_to_its_bound() -> None:
    async def scenario() -> None:
        served = ServedUdp(hold=True)
        mesh = _pair(served)
        answers: list[bytes] = []
        tunnel = await _open(mesh, answers, [])
        for _ in range(100):
            assert tunnel.send(bytes(1000))
            await asyncio.sleep(0)
        await until(lambda: bool(served.udp) and served.udp[0].datagrams.dropped["early"]
                    + served.udp[0].datagrams.early_bytes // 1000 == 100)
        held = served.udp[0].datagrams
        assert held.early_bytes == MAX_EARLY // 1000 * 1000 and held.dropped["early"] == 100 - MAX_EARLY // 1000
        served.accept(served.udp[0])  # the upstream is open: what was held goes first
        await until(lambda: len(answers) == MAX_EARLY // 1000)
        await _close(mesh)

    asyncio.run(scenario())


def test_udp_channels_count_against_max_channels_with_tcp_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "MAX_CHANNELS", 3)

    async def scenario() -> None:
        served = ServedUdp(hold=True)
        mesh = _pair(served)
        loop = asyncio.get_running_loop()
        tunnels = [await _open(mesh, [], []) for _ in range(2)]
        link = mesh.state["b"].link
        assert link is not None
        tcp = loop.create_task(mesh.open_stream("b", _flow(9), loop.time() + 30))  # held unanswered
        await until(lambda: len(link.bridges) == 3)
        with pytest.raises(TransportDown, match="3 flows open"):
            await link.open_datagrams(META, print, print, loop.time() + 5)
        # a peer past the bound has its channel closed at once, whatever it carries
        answering: Link = next(iter(mesh.peer_answerer.links.values()))  # type: ignore[attr-defined]
        raw = link.pc.createDataChannel(label_of(META, udp=True), ordered=False, maxRetransmits=0)
        closed = asyncio.Event()
        raw.on("close", closed.set)
        async with asyncio.timeout(10):
            await closed.wait()
        assert answering.refused_channels == 1 and len(served.udp) == 2
        tunnels[0].close()
        await until(lambda: len(link.bridges) == 2)
        assert isinstance(await _open(mesh, [], []), DatagramChannel)  # room again
        tcp.cancel()
        await _close(mesh)

    asyncio.run(scenario())


def test_a_lost_connection_ends_both_sides_with_an_error() -> None:
    async def scenario() -> None:
        served = ServedUdp()
        mesh = _pair(served)
        answers: list[bytes] = []
        ends: list[GateError | None] = []
        tunnel = await _open(mesh, answers, ends)
        tunnel.send(b"ping")
        await until(lambda: bool(answers))
        link = mesh.state["b"].link
        assert link is not None
        link.close("test")
        await until(lambda: bool(ends) and bool(served.ends))
        assert isinstance(ends[0], UpstreamUnreachable) and "webrtc: test" in str(ends[0])
        end: StreamEnd = served.ends[0]
        assert end.close == Close.CLIENT_RESET and end.bytes_in == 4 and end.bytes_out == 9
        await _close(mesh)

    asyncio.run(scenario())
