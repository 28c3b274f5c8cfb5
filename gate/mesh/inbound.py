"""Flows a peer gate sends us, one per stream, whatever transport carried them.

That is every stream of a session the ``h2`` listener accepts, and of the reverse tunnels this gate
keeps open to a peer (it dials out, then serves the streams the peer opens). The sender must be a
configured gate whose ``allow`` list admits the destination; the flow then takes this gate's routes
through the same upstream opener as every other flow (direct, upstream, or ``via`` another peer), and
is bridged to the upstream socket. Refusals are answered by the transport in its terms; the dialling
gate maps them back to its client's protocol.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gate.addr import Endpoint
from gate.config import PeerSpec
from gate.deadlines import Sweeper, sweep_interval
from gate.errors import GateError, RejectedByRule, UpstreamError
from gate.flow import Close, Flow, FlowState
from gate.mesh.transport import DatagramStream, FlowMeta, Stream, StreamEnd
from gate.mesh.udp_relay import UdpRelay
from gate.router import why_not
from gate.upstream import Opener, Upstream

if TYPE_CHECKING:
    from gate.context import Context

__all__ = ["Inbound"]

log = logging.getLogger("ugate")
NOBODY = Endpoint("0.0.0.0", 0)  # the client of a request that named none


class Inbound:
    """Serves the streams peers open to us, for one listener (or one reverse tunnel)."""

    def __init__(self, name: str, ctx: Context, connect_timeout: float, idle_timeout: float) -> None:
        self.name = name  # the listener name of these flows in routes and the access log
        self.ctx = ctx
        self.idle_timeout = idle_timeout
        self.opener = Opener(ctx, name, connect_timeout)
        self.sweeper = Sweeper(asyncio.get_running_loop(), sweep_interval(idle_timeout))
        self.tasks: set[asyncio.Task[None]] = set()
        self.flows: dict[Stream | DatagramStream, Flow] = {}  # bridged streams, until they end
        self.idle: dict[Stream | DatagramStream, _IdleWatch] = {}

    def serve(self, ident: str, peer: PeerSpec | None, meta: FlowMeta | GateError,
              stream: Stream | DatagramStream) -> Callable[[str], None]:
        """A stream arrived from the gate with ID ``ident`` (``peer``: its configured entry, if any).
        Returns what the transport calls (with the reason) when the stream ends before it is bridged:
        its setup is cancelled, before the dial if it has not started, closing the upstream if it has."""
        if isinstance(stream, DatagramStream):
            return functools.partial(_abandon, self._spawn(self._serve_udp(ident, peer, meta, stream)))
        return functools.partial(_abandon, self._spawn(self._serve(ident, peer, meta, stream)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _admit(self, ident: str, peer: PeerSpec | None, flow: Flow) -> None:
        """The trust rules for any served flow: a configured peer whose allow list admits it."""
        if peer is None:
            raise RejectedByRule(f"gate {ident} is not a configured peer")
        key = self.opener.key(flow)
        if not any(why_not(allowed, key) is None for allowed in peer.allow):
            raise RejectedByRule(f"peer {peer.name} may not reach {flow.dst}")

    async def _serve(self, ident: str, peer: PeerSpec | None, meta: FlowMeta | GateError, stream: Stream) -> None:
        if isinstance(meta, GateError):  # a request the transport could not read a flow from
            self._refuse(stream, self.ctx.begin(Flow(listener=self.name, client=NOBODY)), meta)
            return
        flow = self.ctx.begin(meta.flow(self.name))
        upstream: Upstream | None = None
        try:
            self._admit(ident, peer, flow)
            upstream = await self.opener.open(self.opener.decide(flow), flow)
            if upstream.header:
                try:
                    await asyncio.get_running_loop().sock_sendall(upstream.sock, upstream.header)
                except OSError as e:
                    upstream.sock.close()
                    raise UpstreamError(f"upstream write failed: {e.strerror}") from None
                flow.bytes_up += len(upstream.header)
        except GateError as e:
            self._refuse(stream, flow, e)
            return
        except asyncio.CancelledError as e:
            if upstream is not None:
                upstream.sock.close()
            if e.args:  # abandoned: the peer reset the stream or the tunnel was lost (the reason)
                stream.cancel(Close.CLIENT_RESET)
                self.ctx.finish(flow, Close.CLIENT_RESET, str(e.args[0]))
            else:
                stream.cancel(Close.SHUTDOWN)
                self.ctx.finish(flow, Close.SHUTDOWN)
            raise
        flow.state, flow.path = FlowState.RELAYING, stream.path
        self.flows[stream] = flow
        if await stream.accept(upstream.sock, lambda end: self._ended(stream, flow, end)) and stream in self.flows:
            watch = self.idle[stream] = _IdleWatch(stream, self.idle_timeout)
            self.sweeper.add(watch)

    async def _serve_udp(self, ident: str, peer: PeerSpec | None, meta: FlowMeta | GateError,
                         stream: DatagramStream) -> None:
        """A CONNECT-UDP stream: the same trust rules, routes, loop guard and hop limit as a TCP flow,
        then a UDP socket connected to the destination, datagrams relayed both ways (UdpRelay)."""
        if isinstance(meta, GateError):
            self._refuse(stream, self.ctx.begin(Flow(listener=self.name, client=NOBODY)), meta)
            return
        flow = self.ctx.begin(meta.flow(self.name))
        flow.path = stream.path
        relay: UdpRelay | None = None
        try:
            self._admit(ident, peer, flow)
            relay = await UdpRelay.open(self.opener, flow)
        except GateError as e:
            self._refuse(stream, flow, e)
            return
        except asyncio.CancelledError as e:
            stream.cancel(Close.CLIENT_RESET if e.args else Close.SHUTDOWN)
            self.ctx.finish(flow, Close.CLIENT_RESET if e.args else Close.SHUTDOWN, str(e.args[0]) if e.args else None)
            raise
        flow.state = FlowState.RELAYING
        self.flows[stream] = flow
        tunnel = stream.accept_datagrams(relay.to_upstream, lambda end: self._ended_udp(stream, flow, relay, end))
        if tunnel is None:
            return
        relay.start(tunnel)
        if stream in self.flows:
            watch = self.idle[stream] = _IdleWatch(stream, self.idle_timeout)
            self.sweeper.add(watch)

    def _ended_udp(self, stream: DatagramStream, flow: Flow, relay: UdpRelay, end: StreamEnd) -> None:
        relay.close()
        self.flows.pop(stream, None)
        watch = self.idle.pop(stream, None)
        if watch is not None:
            self.sweeper.discard(watch)
        self.ctx.finish(flow, end.close, end.detail)

    def _refuse(self, stream: Stream | DatagramStream, flow: Flow, error: GateError) -> None:
        stream.refuse(error)
        self.ctx.finish(flow, error.close, str(error))

    def _ended(self, stream: Stream, flow: Flow, end: StreamEnd) -> None:
        self.flows.pop(stream, None)
        watch = self.idle.pop(stream, None)
        if watch is not None:
            self.sweeper.discard(watch)
        flow.bytes_up += end.bytes_in
        flow.bytes_down += end.bytes_out
        self.ctx.finish(flow, end.close, end.detail)

    async def drain(self, timeout: float) -> None:
        """Let open flows finish for up to ``timeout``, then cancel what is still being set up and cut
        the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.flows and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.tasks):
            task.cancel()
        for stream in list(self.flows):
            stream.cancel(Close.SHUTDOWN)
        for flow in list(self.flows.values()):
            self.ctx.finish(flow, Close.SHUTDOWN)
        self.flows.clear()
        self.sweeper.close()
        self.opener.close()


def _abandon(task: asyncio.Task[None], reason: str) -> None:
    task.cancel(reason)  # a task that has not started yet never runs: nothing is dialled


class _IdleWatch:
    """Ends a served flow that moved no byte either way for ``timeout`` seconds (as the TCP relays'
    idle timeout does): the peer and the upstream both see a reset."""

    __slots__ = ("stream", "timeout")

    def __init__(self, stream: Stream | DatagramStream, timeout: float) -> None:
        self.stream = stream
        self.timeout = timeout

    def deadline(self) -> float:
        return self.stream.last_active + self.timeout

    def expire(self) -> None:
        self.stream.cancel(Close.IDLE)
