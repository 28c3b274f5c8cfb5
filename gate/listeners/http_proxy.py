"""HTTP proxy listener: CONNECT tunnels (then a raw relay) and absolute-URI request forwarding.

h11 parses and frames both sides; the client connection stays open across requests, also when they go
to different origins. One upstream connection is kept per client connection and reused while requests
go to the same place. Each forwarded request is one flow in the access log.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import h11

from gate.addr import Endpoint, is_ip
from gate.config import HttpSpec, MuxSpec
from gate.context import Context
from gate.errors import (
    ClientProtocolError,
    GateError,
    HandshakeTimeout,
    RefusedByPolicy,
    RejectedByRule,
    UpstreamError,
    UpstreamTimeout,
)
from gate.flow import Close, Flow
from gate.listeners.tcp import TcpListener
from gate.proto.http import TargetError, check_basic_auth, connect_authority, forward_headers, split_absolute_uri
from gate.runner import FlowRunner
from gate.upstream import Upstream

__all__ = ["HttpListener", "HttpProxy"]

# A request or response head larger than this is refused (431 / 502): no legitimate client needs more,
# and it bounds what one connection can make us buffer.
MAX_HEAD = 64 * 1024
RECV_SIZE = 256 * 1024
VIA = b"1.1 ugate"


class _ClientGone(Exception):
    """The client closed its connection between or during requests."""


def _status_for(error: GateError) -> int:
    if isinstance(error, (RejectedByRule, RefusedByPolicy)):
        return 403
    if isinstance(error, UpstreamTimeout):
        return 504
    if isinstance(error, UpstreamError):
        return 502
    return 400


class HttpProxy:
    """The HTTP proxy's requests and answers, for the ``http`` listener and the ``mux`` one. Each
    forwarded request is a flow of its own, ended here; a CONNECT tunnel goes to the runner's relay."""

    def __init__(self, spec: HttpSpec | MuxSpec, runner: FlowRunner) -> None:
        self.spec = spec
        self.runner = runner
        self.ctx = runner.ctx
        self.loop = runner.loop

    async def serve(self, conn: socket.socket, flow: Flow) -> None:
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if flow.preread:  # bytes a mux listener read while sniffing (b"" would tell h11 "closed")
            client.receive_data(flow.preread)
            flow.preread = b""
        session = _UpstreamSession()
        try:
            first = True
            while True:
                wait = self.spec.timeouts.handshake if first else self.spec.timeouts.idle
                try:
                    request = await self._next_request(conn, client, wait)
                except _ClientGone as gone:
                    if first:
                        flow.closing(Close.CLIENT_ERROR, str(gone))  # a connection that never asked
                    return
                flow = flow if first else self.ctx.begin(Flow(listener=flow.listener, client=flow.client))
                first = False
                if not await self._serve_request(conn, client, request, flow, session):
                    return
                if client.our_state is h11.MUST_CLOSE or client.their_state is not h11.DONE:
                    return
                client.start_next_cycle()
        finally:
            session.close()

    async def _serve_request(
        self, conn: socket.socket, client: h11.Connection, request: h11.Request, flow: Flow,
        session: _UpstreamSession,
    ) -> bool:
        """Answer one request; False when the client connection must end (or was handed to a relay)."""
        if self.spec.users and not check_basic_auth(request.headers, self.spec.users):
            realm = self.spec.realm.replace('"', "")
            await self._error(conn, client, flow, 407, "proxy authentication required",
                              [(b"proxy-authenticate", f'Basic realm="{realm}"'.encode())])
            self.ctx.finish(flow, Close.CLIENT_ERROR, "407 proxy authentication required")
            return False
        try:
            if request.method == b"CONNECT":
                await self._tunnel(conn, client, request, flow)
                return False
            await self._forward(conn, client, request, flow, session)
            return True
        except TargetError as e:
            flow.closing(Close.CLIENT_ERROR, f"400 {e}")
            await self._error(conn, client, flow, 400, str(e))
        except GateError as e:
            status = _status_for(e)
            flow.closing(e.close, f"{status} {e}")
            await self._error(conn, client, flow, status, str(e))
        self.ctx.finish(flow)
        return False

    async def _next_request(self, conn: socket.socket, client: h11.Connection, wait: float) -> h11.Request:
        try:
            async with asyncio.timeout(wait):
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        data = await self.loop.sock_recv(conn, RECV_SIZE)
                        client.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        return event
                    raise _ClientGone("client closed")  # ConnectionClosed (PAUSED cannot happen here)
        except h11.RemoteProtocolError as e:
            await self._error(conn, client, None, e.error_status_hint, f"bad request: {e}")
            raise ClientProtocolError(f"bad request: {e}") from None
        except TimeoutError:
            if client.their_state is h11.IDLE and not client.trailing_data[0]:
                raise _ClientGone("idle timeout") from None  # nothing was sent: close without an answer
            await self._error(conn, client, None, 408, "request head not received in time")
            raise HandshakeTimeout("request head not received in time") from None

    async def _tunnel(self, conn: socket.socket, client: h11.Connection, request: h11.Request, flow: Flow) -> None:
        flow.dst = connect_authority(request.target)
        flow.host = None if is_ip(flow.dst.host) else flow.dst.host.lower()
        def established() -> bytes:  # only once connected: h11 then takes the connection as switched
            data = client.send(h11.Response(status_code=200, headers=[], reason=b"Connection established"))
            assert data is not None
            return data

        if self.runner.sniffs_in_tunnel(flow):
            # a route depends on the tunnel's first bytes, which come only after our 200: answer first,
            # then sniff, route and connect (a failed upstream can then only be told by a reset)
            await self.loop.sock_sendall(conn, established())
            flow.preread = client.trailing_data[0]
            await self.runner.sniff_tunnel(conn, flow)
            await self.runner.connect_and_relay_or_reset(conn, flow)  # a PROXY header goes before the bytes
            return
        upstream = await self.runner.connect(flow)
        try:
            await self.loop.sock_sendall(conn, established())
        except BaseException:
            upstream.sock.close()
            raise
        flow.preread += client.trailing_data[0]
        await self.runner.relay(conn, flow, upstream)

    async def _forward(
        self, conn: socket.socket, client: h11.Connection, request: h11.Request, flow: Flow,
        session: _UpstreamSession,
    ) -> None:
        origin, path = split_absolute_uri(request.target)
        flow.dst = origin
        flow.host = None if is_ip(origin.host) else origin.host.lower()
        flow.path = "http"
        opener = self.runner.opener
        decision = opener.decide(flow)
        if decision.action == "reject":
            raise RejectedByRule(f"rejected by {decision.rule}")
        # reused while the next request goes the same way (same origin or upstream, same peer)
        way = (decision.via, decision.upstream or origin)
        upstream = await session.get(way, lambda: self._connect_with_header(opener.open(decision, flow), flow))
        flow.peer = decision.via
        headers = forward_headers(request.headers, VIA)
        if not any(name == b"host" for name, _ in headers):
            headers.insert(0, (b"host", str(origin).encode()))
        head = h11.Request(method=request.method, target=path, headers=headers)
        try:
            await self._send_request(conn, client, upstream, head, flow)
            await self._relay_response(conn, client, upstream, flow)
        except UpstreamError:
            session.close()
            raise
        if upstream.h11.our_state is h11.DONE and upstream.h11.their_state is h11.DONE:
            upstream.h11.start_next_cycle()
        else:
            session.close()
        self.ctx.finish(flow, Close.DONE)

    async def _connect_with_header(self, opening: Awaitable[Upstream], flow: Flow) -> socket.socket:
        """A new upstream connection for forwarded requests, opened with the PROXY protocol header when
        the route asks for one (once per connection, as the protocol defines: the connection is then
        reused by this client's next requests that go the same way)."""
        upstream = await opening
        if upstream.header:
            try:
                await self.loop.sock_sendall(upstream.sock, upstream.header)
            except OSError as e:
                upstream.sock.close()
                raise UpstreamError(f"upstream write failed: {e.strerror}") from None
            flow.bytes_up += len(upstream.header)
        return upstream.sock

    async def _send_request(
        self, conn: socket.socket, client: h11.Connection, upstream: _Upstream, head: h11.Request, flow: Flow
    ) -> None:
        await upstream.send(head, flow)
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(self.spec.timeouts.idle):
                    client.receive_data(await self.loop.sock_recv(conn, RECV_SIZE))
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise ClientProtocolError("client closed during the request body")
            if isinstance(event, (h11.Data, h11.EndOfMessage)):
                await upstream.send(event, flow)
            if isinstance(event, h11.EndOfMessage):
                return

    async def _relay_response(
        self, conn: socket.socket, client: h11.Connection, upstream: _Upstream, flow: Flow
    ) -> None:
        started = False
        while True:
            try:
                event = upstream.h11.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self.spec.timeouts.idle):
                        data = await self.loop.sock_recv(upstream.sock, RECV_SIZE)
                    upstream.h11.receive_data(data)
                    continue
            except (h11.RemoteProtocolError, OSError, TimeoutError) as e:
                if started:  # too late for an error status: cut the client off
                    raise ClientProtocolError(f"upstream broke mid-response: {e}") from None
                if isinstance(e, TimeoutError):
                    raise UpstreamTimeout("no response in time") from None
                raise UpstreamError(f"bad response: {e}") from None
            if isinstance(event, h11.ConnectionClosed):
                if started:
                    raise ClientProtocolError("upstream closed mid-response")
                raise UpstreamError("upstream closed without a response")
            if isinstance(event, h11.Response):
                started = True
                event = h11.Response(status_code=event.status_code, reason=event.reason,
                                     headers=forward_headers(event.headers, VIA))
            assert isinstance(event, (h11.InformationalResponse, h11.Response, h11.Data, h11.EndOfMessage))
            data = client.send(event)
            if data:
                await self.loop.sock_sendall(conn, data)
                flow.bytes_down += len(data)
            if isinstance(event, h11.EndOfMessage):
                return

    async def _error(
        self, conn: socket.socket, client: h11.Connection, flow: Flow | None, status: int, reason: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer ``status`` and mark the connection for closing (the request body may be unread)."""
        if flow is not None:
            flow.closing(Close.CLIENT_ERROR if status < 500 else Close.UPSTREAM_ERROR, f"{status} {reason}")
        if client.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already under way: the caller closes the connection
        body = f"{status} {reason}\n".encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *(extra or [])]
        try:
            data = b"".join(client.send(event) or b"" for event in (
                h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()))
        except h11.LocalProtocolError:  # e.g. the request could not be parsed into a state we answer
            data = _raw_error(status, body, extra or [])
        try:
            await self.loop.sock_sendall(conn, data)
        except OSError:
            pass


def _raw_error(status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> bytes:
    head = [f"HTTP/1.1 {status} Error".encode(), b"content-type: text/plain", b"connection: close",
            b"content-length: " + str(len(body)).encode(), *(n + b": " + v for n, v in extra)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _Upstream:
    """One connection to an origin (or fixed upstream) with its own h11 client state."""

    def __init__(self, way: tuple[str | None, Endpoint], sock: socket.socket) -> None:
        self.way = way
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.loop = asyncio.get_running_loop()

    async def send(self, event: Any, flow: Flow) -> None:
        data = self.h11.send(event)
        if data:
            try:
                await self.loop.sock_sendall(self.sock, data)
            except OSError as e:
                raise UpstreamError(f"upstream write failed: {e.strerror}") from None
            flow.bytes_up += len(data)


class _UpstreamSession:
    """Keeps the last upstream connection of a client connection for reuse by its next request."""

    def __init__(self) -> None:
        self.current: _Upstream | None = None

    async def get(self, way: tuple[str | None, Endpoint],
                  connect: Callable[[], Awaitable[socket.socket]]) -> _Upstream:
        if self.current is not None and self.current.way == way and self.current.h11.our_state is h11.IDLE:
            return self.current
        self.close()
        self.current = _Upstream(way, await connect())
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.sock.close()
            self.current = None


class HttpListener(TcpListener):
    spec: HttpSpec

    def __init__(self, spec: HttpSpec, ctx: Context) -> None:
        super().__init__(spec, ctx)
        self.http = HttpProxy(spec, self.runner)

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        self.runner.handshake(conn, flow, self.http.serve)
