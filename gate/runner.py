"""The flow runner: moves each flow of one TCP listener through its states and ends it in one place.

    ACCEPTED -> HANDSHAKE (the kind's protocol) and/or SNIFFING (first bytes)
             -> ROUTED -> CONNECTING (gate.upstream.Opener) -> RELAYING (splice.Relay) -> DONE

Listener kinds only parse their handshake and answer in their protocol; they hand the flow here with
``handshake`` (a coroutine of theirs, run in a task) or ``forward`` (the destination is known at
accept: tproxy, redirect, forward, sni). A flow whose upstream is an address literal and that has
nothing to say first is connected and relayed by callbacks alone, without a task: per-flow cost is
what limits the connection rate. However it goes, every flow ends in ``Context.finish``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

from gate.config import ListenerSpec
from gate.context import Context
from gate.deadlines import Sweeper, sweep_interval
from gate.dial import Connect
from gate.errors import ClientProtocolError, GateError
from gate.flow import Close, Flow, FlowState
from gate.intercept import Event, FlowView, transform_for
from gate.sniffing import FirstBytes, sniff_at_once
from gate.upstream import Opener, Upstream
from splice import Relay

__all__ = ["FlowRunner", "reset"]

log = logging.getLogger("ugate")

Handshake = Callable[[socket.socket, Flow], Awaitable[None]]
_RELAY_CLOSE = {"eof": Close.EOF, "idle timeout": Close.IDLE, "shutdown": Close.SHUTDOWN,
                "internal error": Close.INTERNAL}


def reset(sock: socket.socket) -> None:
    """Make the coming close() send RST instead of FIN (SO_LINGER with a zero timeout)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _send_some(sock: socket.socket, data: bytes) -> int:
    """Send what ``sock`` takes now without waiting (errors surface later, in the relay)."""
    try:
        return sock.send(data)
    except OSError:
        return 0


def relay_close(reason: str) -> tuple[Close, str | None]:
    """A relay's close reason ("eof", "client reset", "upstream ECONNRESET", ...) as Close + detail."""
    known = _RELAY_CLOSE.get(reason)
    if known is not None:
        return known, None
    side, _, what = reason.partition(" ")
    if side == "intercept":
        return Close.INTERCEPT_ERROR, what
    close = Close.CLIENT_RESET if side == "client" else Close.UPSTREAM_RESET
    return close, None if what == "reset" else what


class FlowRunner:
    """Runs the flows of one TCP listener (see the module docstring)."""

    def __init__(self, spec: ListenerSpec, ctx: Context) -> None:
        self.spec = spec
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        # coarse shared timers for idle relays, pending connects and sniffs (cheaper than one per flow)
        self._idle_sweeper = Sweeper(self.loop, sweep_interval(spec.timeouts.idle))
        self._sniff_sweeper = Sweeper(self.loop, sweep_interval(spec.timeouts.sniff))
        self.opener = Opener(ctx, spec.name, spec.timeouts.connect, preserve_source=spec.preserve_source,
                             sweeper=Sweeper(self.loop, sweep_interval(spec.timeouts.connect)))
        self._tasks: set[asyncio.Task[None]] = set()
        self._sniffing: dict[FirstBytes, socket.socket] = {}
        self._connecting: dict[Connect, tuple[socket.socket, Flow]] = {}
        self._relays: set[Relay] = set()
        self._handed: set[socket.socket] = set()  # client sockets a handshake task handed to a relay
        self._soon = 0  # flows whose sniffing is scheduled (see ``forward``)
        self._idle = asyncio.Event()
        self._idle.set()
        self.on_end: Callable[[Flow], None] = lambda flow: None  # tells the accept loop a flow ended

    @property
    def active(self) -> int:
        return len(self._tasks) + len(self._sniffing) + len(self._connecting) + len(self._relays) + self._soon

    # -- entering --------------------------------------------------------------------------------

    def handshake(self, conn: socket.socket, flow: Flow, serve: Handshake) -> None:
        """HANDSHAKE: run the kind's ``serve(conn, flow)`` in a task. It reads its protocol, answers in
        it, and hands the flow to ``relay`` (or raises a GateError, which ends the flow)."""
        self.ctx.begin(flow)
        self._idle.clear()
        if flow.state is FlowState.ACCEPTED:
            flow.state = FlowState.HANDSHAKE
        self._tasks.add(self.loop.create_task(self._serve(conn, flow, serve)))

    def forward(self, conn: socket.socket, flow: Flow) -> None:
        """For kinds that know the destination at accept (forward, tproxy, redirect): sniff when the
        listener does, then route and connect; failures reset the client (no protocol to answer in)."""
        assert flow.dst is not None
        self.ctx.begin(flow)
        self._idle.clear()
        if self.spec.sniffs(flow.dst):
            # not at once: a client's first bytes usually follow its handshake by microseconds, and after
            # the rest of this accept batch they are mostly there, so one read settles the sniff without
            # a poll registration and a second wake-up (measured: sniff cost 16% -> 10% of conn/s)
            self._soon += 1
            self.loop.call_soon(self._sniff_soon, conn, flow)
        else:
            self.route(conn, flow)

    def _sniff_soon(self, conn: socket.socket, flow: Flow) -> None:
        self._soon -= 1
        self._sniff(conn, flow, self.spec.timeouts.sniff, lambda: self.route(conn, flow))

    # -- SNIFFING --------------------------------------------------------------------------------

    def sniff(self, conn: socket.socket, flow: Flow, wait: float, then: Callable[[], None]) -> None:
        """Classify the flow's first bytes (at most ``wait`` seconds), then ``then()``; a client that
        breaks off meanwhile is closed and logged."""
        self.ctx.begin(flow)
        self._idle.clear()
        self._sniff(conn, flow, wait, then)

    def _sniff(self, conn: socket.socket, flow: Flow, wait: float, then: Callable[[], None]) -> None:
        flow.state = FlowState.SNIFFING
        settled = sniff_at_once(conn, flow)
        if settled is not None:  # no waiting (and no extra poll registration) needed
            if settled:
                self.ctx.sniff_outcomes.record(flow)
                then()
            else:
                self._end(conn, flow)
            return

        def sniffed(ok: bool) -> None:
            del self._sniffing[watcher]
            if ok:
                self.ctx.sniff_outcomes.record(flow, watcher.timed_out)
                then()
            else:
                self._end(conn, flow)

        watcher = FirstBytes(self.loop, conn, flow, wait, self._sniff_sweeper, sniffed)
        self._sniffing[watcher] = conn

    def sniffs_in_tunnel(self, flow: Flow) -> bool:
        """For proxies (SOCKS, CONNECT): sniff the tunnel's first bytes before routing? Only when the
        listener sniffs and a route could decide differently on what sniffing finds, since the client
        must then be told "connected" before any upstream exists (it sends nothing until then)."""
        assert flow.dst is not None
        return self.spec.sniffs(flow.dst) and self.opener.needs_sniff(flow)

    async def sniff_tunnel(self, conn: socket.socket, flow: Flow) -> None:
        """Classify a tunnel's first bytes (bounded wait, as for transparent flows) into ``flow``;
        ClientProtocolError when the client breaks off meanwhile."""
        flow.state = FlowState.SNIFFING
        settled, timed_out = sniff_at_once(conn, flow), False
        if settled is None:
            done: asyncio.Future[bool] = self.loop.create_future()
            # not in self._sniffing: this flow belongs to the handshake task, which drain cancels
            watcher = FirstBytes(self.loop, conn, flow, self.spec.timeouts.sniff, self._sniff_sweeper,
                                 done.set_result)
            try:
                settled = await done
            finally:
                watcher.cancel()  # only does something when we were cancelled (shutdown)
            timed_out = watcher.timed_out
        if not settled:
            raise ClientProtocolError(flow.detail or "client went away")
        self.ctx.sniff_outcomes.record(flow, timed_out)

    # -- ROUTED -> CONNECTING --------------------------------------------------------------------

    def route(self, conn: socket.socket, flow: Flow) -> None:
        """Route a flow whose destination is known and connect it: by callbacks when the decision
        names an address literal, else (rejects, names to resolve, peers) in a task."""
        decision = self.opener.decide(flow)
        literal = self.opener.literal(decision, flow)
        if literal is None:
            self.handshake(conn, flow, self.connect_and_relay_or_reset)
            return

        def connected(upstream: Upstream | None, error: GateError | None) -> None:
            if attempt is not None:
                del self._connecting[attempt]
            if upstream is None:
                assert error is not None
                flow.closing(error.close, str(error))
                reset(conn)
                self._end(conn, flow)
                return
            preread = upstream.header + flow.preread  # (b"" + bytes is the same object: no copy)
            sent = _send_some(upstream.sock, preread) if preread else 0
            flow.bytes_up += sent
            flow.preread = preread[sent:]
            if flow.preread:  # the new socket could not take all sniffed bytes at once: a task waits
                self.handshake(conn, flow, lambda c, f: self.relay(c, f, Upstream(upstream.sock)))
            else:
                self._start_relay(conn, flow, upstream.sock)

        attempt: Connect | None = None
        attempt = self.opener.open_soon(decision, flow, literal[0], literal[1], connected)
        if attempt is not None:
            self._connecting[attempt] = (conn, flow)

    async def connect(self, flow: Flow) -> Upstream:
        """Route ``flow`` and open its upstream; RejectedByRule, RefusedByPolicy or an UpstreamError."""
        return await self.opener.open(self.opener.decide(flow), flow)

    async def connect_and_relay_or_reset(self, conn: socket.socket, flow: Flow) -> None:
        """Connect and relay a flow whose client was already told it is connected (or speaks a protocol
        with no error answer): a failed upstream can only be told by a reset."""
        try:
            upstream = await self.connect(flow)
        except GateError:
            reset(conn)
            raise
        await self.relay(conn, flow, upstream)

    # -- RELAYING --------------------------------------------------------------------------------

    async def relay(self, conn: socket.socket, flow: Flow, upstream: Upstream) -> None:
        """Send the PROXY header and what the handshake read ahead, then relay until the flow ends."""
        first = upstream.header + flow.preread
        if first:
            try:
                await self.loop.sock_sendall(upstream.sock, first)
            except OSError as e:
                upstream.sock.close()
                flow.closing(Close.UPSTREAM_RESET, e.strerror)
                raise
            except BaseException:
                upstream.sock.close()
                raise
            flow.bytes_up += len(first)
            flow.preread = b""
        self._start_relay(conn, flow, upstream.sock)
        self._handed.add(conn)  # the task that called us must not close it (see _serve)

    def _start_relay(self, conn: socket.socket, flow: Flow, upstream: socket.socket) -> None:
        transform = None
        if flow.intercept is not None:
            try:
                transform = transform_for(flow.intercept, flow)
            except Exception as e:  # the interceptor's open event: this flow only is reset
                log.warning("%s: interceptor of route %s failed on open: %r", self.spec.name, flow.rule, e)
                flow.intercept = None  # no close event for a flow it never opened
                flow.closing(Close.INTERCEPT_ERROR, f"{type(e).__name__}: {e}")
                for sock in (conn, upstream):
                    reset(sock)
                upstream.close()
                self._end(conn, flow)
                return
        relay = Relay(conn, upstream, mode=self.spec.relay, idle_timeout=self.spec.timeouts.idle,
                      on_done=lambda r: self._relay_done(flow, r), loop=self.loop,
                      sweeper=self._idle_sweeper, transform=transform)
        flow.state = FlowState.RELAYING
        flow.path = relay.path
        flow.relay = relay
        self._relays.add(relay)
        try:
            relay.start()
        except Exception:  # e.g. uvloop refusing a poll handle of a socket closed under us (seen fuzzing)
            log.exception("%s: relay of %s did not start", self.spec.name, flow.client)
            try:
                relay.abort("internal error")  # closes both sockets and ends the flow through _relay_done
            except Exception:
                log.exception("%s: and could not be aborted", self.spec.name)  # cleaned up below
            if flow.state is not FlowState.DONE:  # it failed before the relay could report
                self._relays.discard(relay)
                upstream.close()
                flow.relay = None
                flow.closing(Close.INTERNAL, "relay did not start")
                self._end(conn, flow)

    def _relay_done(self, flow: Flow, relay: Relay) -> None:
        self._relays.discard(relay)
        flow.path = relay.path  # an "auto" relay may have moved to splice since it started
        flow.relay = None  # the relay's on_done refers to the flow: no cycle left behind
        flow.bytes_up += relay.bytes_up
        flow.bytes_down += relay.bytes_down
        close, detail = relay_close(relay.close_reason)
        if flow.intercept is not None:
            try:
                flow.intercept(Event("close", FlowView.of(flow), reason=close + (f": {detail}" if detail else "")))
            except Exception as e:
                log.warning("%s: interceptor of route %s failed on close: %r", self.spec.name, flow.rule, e)
        self._finished(flow, close, detail)

    # -- DONE ------------------------------------------------------------------------------------

    async def _serve(self, conn: socket.socket, flow: Flow, serve: Handshake) -> None:
        try:
            await serve(conn, flow)
        except GateError as e:
            flow.closing(e.close, str(e) or type(e).__name__)
        except TimeoutError:
            flow.closing(Close.HANDSHAKE_TIMEOUT)  # connect timeouts arrive as UpstreamTimeout
        except OSError as e:
            flow.closing(Close.CLIENT_ERROR, e.strerror or type(e).__name__)
        except asyncio.CancelledError:
            flow.closing(Close.SHUTDOWN)
        except Exception:
            log.exception("%s: bug while serving %s", self.spec.name, flow.client)
            flow.closing(Close.INTERNAL)
        finally:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.discard(task)
            if conn in self._handed:  # a relay owns the sockets now (and ends the flow it relays)
                self._handed.discard(conn)
            else:
                self._end(conn, flow)

    def refuse(self, conn: socket.socket, flow: Flow, close: Close, detail: str | None = None) -> None:
        """End a flow before any upstream exists: the client gets a reset, the log the reason."""
        flow.closing(close, detail)
        reset(conn)
        self._end(conn, flow)

    def _end(self, conn: socket.socket, flow: Flow) -> None:
        """Close a client socket the loop may still watch (a sniffer leaves its registration parked for
        the relay to take over, see sniffing.park), then finish the flow."""
        if conn.fileno() >= 0:
            self.loop.remove_reader(conn.fileno())
        conn.close()
        self._finished(flow, Close.CLIENT_ERROR, "client went away")

    def _finished(self, flow: Flow, close: Close, detail: str | None) -> None:
        flow.closing(close, detail)
        self.ctx.finish(flow)
        if self.active == 0:
            self._idle.set()
        self.on_end(flow)

    # -- shutdown --------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for open flows to end by themselves, then cut the rest."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            pass
        for watcher, conn in list(self._sniffing.items()):
            watcher.cancel()
            del self._sniffing[watcher]
            watcher.flow.closing(Close.SHUTDOWN)
            self._end(conn, watcher.flow)
        for attempt, (conn, flow) in list(self._connecting.items()):
            attempt.cancel()
            del self._connecting[attempt]
            flow.closing(Close.SHUTDOWN)
            self._end(conn, flow)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for relay in list(self._relays):
            relay.abort("shutdown")
        for sweeper in (self._idle_sweeper, self._sniff_sweeper):
            sweeper.close()
        self.opener.close()
