"""HTTP proxy listener: CONNECT tunnels (then a raw relay) and absolute-URI request forwarding.

h11 parses and frames both sides; the client connection stays open across requests, also when they go
to different origins. One upstream connection is kept per client connection and reused while requests
go to the same place (gate.listeners.http_origin). Each forwarded request is one flow in the access log.
A little over 400 lines: the request/response loop and the error answers of each of its steps read best
together; the origin side is already its own module.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from http import HTTPStatus

import h11

from gate.addr import is_ip
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
from gate.listeners.http_origin import MAX_HEAD, NoResponse, OriginConnection, OriginSession, Outgoing
from gate.listeners.tcp import TcpListener
from gate.proto.http import (
    IDEMPOTENT,
    TargetError,
    check_basic_auth,
    connect_authority,
    forward_headers,
    readable,
    split_absolute_uri,
)
from gate.runner import FlowRunner
from gate.upstream import Upstream

__all__ = ["HttpListener", "HttpProxy"]

RECV_SIZE = 256 * 1024
VIA = b"1.1 ugate"


class _ClientGone(Exception):
    """The client closed its connection between or during requests."""


class _Cut(Exception):
    """Too late for an error answer (a response is under way, or the client is gone): the client
    connection is closed, and the flow ends with ``close`` and ``detail``."""

    def __init__(self, close: Close, detail: str) -> None:
        super().__init__(detail)
        self.close = close
        self.detail = detail


def _status_for(error: GateError) -> int:
    if isinstance(error, (RejectedByRule, RefusedByPolicy)):
        return 403
    if isinstance(error, UpstreamTimeout):
        return 504
    if isinstance(error, UpstreamError):
        return 502
    if isinstance(error, HandshakeTimeout):
        return 408
    return 400


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _buffered(conn: h11.Connection) -> int:
    """Bytes h11 holds unparsed. h11's max_incomplete_event_size bounds only a head still incomplete;
    one that arrives whole in a single read is measured by what parsing it took from this buffer."""
    return len(conn.trailing_data[0])


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
        session = OriginSession()
        current = flow  # the runner ends ``flow``, the first request's; the later ones end here
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
                except GateError as e:  # answered already: a bad or slow request head
                    current = flow if first else self.ctx.begin(Flow(listener=flow.listener, client=flow.client))
                    self.ctx.finish(current, e.close, str(e))
                    return
                current = flow if first else self.ctx.begin(Flow(listener=flow.listener, client=flow.client))
                first = False
                if not await self._serve_request(conn, client, request, current, session):
                    return
                if client.our_state is h11.MUST_CLOSE or client.their_state is not h11.DONE:
                    return
                client.start_next_cycle()
        except BaseException as e:  # shutdown, or a bug (which the runner logs with its traceback)
            if current is not flow:
                self.ctx.finish(current, Close.SHUTDOWN if isinstance(e, asyncio.CancelledError) else Close.INTERNAL)
            raise
        finally:
            session.close()

    async def _serve_request(
        self, conn: socket.socket, client: h11.Connection, request: h11.Request, flow: Flow,
        session: OriginSession,
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
        except _Cut as cut:
            flow.closing(cut.close, cut.detail)
        except TimeoutError:
            flow.closing(Close.HANDSHAKE_TIMEOUT)
        except OSError as e:  # the client's socket broke while we answered (a tunnel's upstream says so first)
            flow.closing(Close.CLIENT_ERROR, e.strerror or type(e).__name__)
        self.ctx.finish(flow)
        return False

    async def _next_request(self, conn: socket.socket, client: h11.Connection, wait: float) -> h11.Request:
        buffered = _buffered(client)
        try:
            async with asyncio.timeout(wait):
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        data = await self.loop.sock_recv(conn, RECV_SIZE)
                        client.receive_data(data)
                        buffered += len(data)
                        continue
                    if isinstance(event, h11.Request):
                        break
                    raise _ClientGone("client closed")  # ConnectionClosed (PAUSED cannot happen here)
        except h11.RemoteProtocolError as e:
            message = _TOO_LARGE_REQUEST if e.error_status_hint == 431 else f"bad request: {readable(str(e))}"
            await self._error(conn, client, None, e.error_status_hint, message)
            raise ClientProtocolError(message) from None
        except TimeoutError:
            if client.their_state is h11.IDLE and not client.trailing_data[0]:
                raise _ClientGone("idle timeout") from None  # nothing was sent: close without an answer
            await self._error(conn, client, None, 408, "request head not received in time")
            raise HandshakeTimeout("request head not received in time") from None
        except OSError as e:
            raise _ClientGone(e.strerror or type(e).__name__) from None
        if buffered - _buffered(client) > MAX_HEAD:
            await self._error(conn, client, None, 431, _TOO_LARGE_REQUEST)
            raise ClientProtocolError(_TOO_LARGE_REQUEST)
        return event

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
        session: OriginSession,
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

        def connect() -> Awaitable[socket.socket]:
            return self._connect_with_header(opener.open(decision, flow), flow)

        upstream = await session.get(way, connect)
        flow.peer = decision.via
        headers = forward_headers(request.headers, VIA)
        if not any(name == b"host" for name, _ in headers):
            headers.insert(0, (b"host", str(origin).encode()))
        try:
            head = h11.Request(method=request.method, target=path, headers=headers)
        except h11.LocalProtocolError as e:
            raise ClientProtocolError(f"request cannot be forwarded: {readable(str(e))}") from None
        outgoing = Outgoing(head, keep=request.method in IDEMPOTENT)
        try:
            await self._exchange(conn, client, upstream, outgoing, flow)
        except NoResponse:
            if not (upstream.reused and outgoing.replayable):
                raise
            session.close()  # the origin had closed it while idle: once more, on a fresh connection
            upstream = await session.get(way, connect)
            await self._exchange(conn, client, upstream, outgoing, flow)
        if upstream.h11.our_state is h11.DONE and upstream.h11.their_state is h11.DONE:
            upstream.h11.start_next_cycle()
            upstream.reused = True
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

    async def _exchange(
        self, conn: socket.socket, client: h11.Connection, upstream: OriginConnection, outgoing: Outgoing, flow: Flow
    ) -> None:
        """Send the request (on a retry: its head and the kept body first, then what the client still
        sends) and relay the response. NoResponse when the upstream failed before answering."""
        await upstream.send(outgoing.head, flow)
        for kept in outgoing.kept or ():
            await upstream.send(kept, flow)
        while not outgoing.complete:
            event = await self._next_body_event(conn, client)
            outgoing.add(event)
            await upstream.send(event, flow)
        await self._relay_response(conn, client, upstream, flow)

    async def _next_body_event(self, conn: socket.socket, client: h11.Connection) -> h11.Data | h11.EndOfMessage:
        """The next piece of the request body. Before any response is sent, so a broken body (bad
        chunk framing, the client closing mid-body) is answered 400."""
        try:
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self.spec.timeouts.idle):
                        data = await self.loop.sock_recv(conn, RECV_SIZE)
                    client.receive_data(data)
                    continue
                if isinstance(event, (h11.Data, h11.EndOfMessage)):
                    return event
                raise ClientProtocolError("client closed during the request body")  # ConnectionClosed
        except h11.RemoteProtocolError as e:
            raise ClientProtocolError(f"bad request body: {readable(str(e))}") from None
        except TimeoutError:
            raise HandshakeTimeout("request body not received in time") from None
        except OSError as e:
            raise _Cut(Close.CLIENT_ERROR, f"client went away during the request body: {e.strerror}") from None

    async def _relay_response(
        self, conn: socket.socket, client: h11.Connection, upstream: OriginConnection, flow: Flow
    ) -> None:
        started = False  # the response head went to the client: too late for an error status
        buffered = received = _buffered(upstream.h11)  # bytes h11 holds / response bytes seen
        while True:
            try:
                event = upstream.h11.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self.spec.timeouts.idle):
                        data = await self.loop.sock_recv(upstream.sock, RECV_SIZE)
                    upstream.h11.receive_data(data)
                    buffered += len(data)
                    received += len(data)
                    continue
            except h11.RemoteProtocolError as e:
                if started:
                    raise _Cut(Close.UPSTREAM_RESET, f"upstream broke mid-response: {readable(str(e))}") from None
                if upstream.h11.trailing_data[1]:  # h11's word for an end-of-file before a whole response
                    raise (UpstreamError if received else NoResponse)("upstream closed without a response") from None
                if e.error_status_hint == 431:
                    raise UpstreamError(_TOO_LARGE_RESPONSE) from None
                raise UpstreamError(f"bad response: {readable(str(e))}") from None
            except TimeoutError:
                if started:
                    raise _Cut(Close.IDLE, "upstream stalled mid-response") from None
                raise UpstreamTimeout("no response in time") from None
            except OSError as e:
                if started:
                    raise _Cut(Close.UPSTREAM_RESET, f"upstream broke mid-response: {e.strerror}") from None
                if not received:
                    raise NoResponse(f"upstream read failed: {e.strerror}") from None
                raise UpstreamError(f"bad response: {e.strerror}") from None
            if isinstance(event, h11.ConnectionClosed):
                if started:
                    raise _Cut(Close.UPSTREAM_RESET, "upstream closed mid-response")
                if not received:
                    raise NoResponse("upstream closed without a response")
                raise UpstreamError("upstream closed without a response")
            if isinstance(event, (h11.InformationalResponse, h11.Response)):
                buffered, size = _buffered(upstream.h11), buffered
                if size - buffered > MAX_HEAD:
                    raise UpstreamError(_TOO_LARGE_RESPONSE)
            if isinstance(event, h11.Response):
                event = h11.Response(status_code=event.status_code, reason=event.reason,
                                     headers=forward_headers(event.headers, VIA))
            elif isinstance(event, h11.EndOfMessage) and event.headers and client.their_http_version != b"1.1":
                event = h11.EndOfMessage()  # trailers exist only in chunked framing, which HTTP/1.0 lacks
            assert isinstance(event, (h11.InformationalResponse, h11.Response, h11.Data, h11.EndOfMessage))
            try:
                data = client.send(event)
            except h11.LocalProtocolError as e:
                if started:
                    raise _Cut(Close.UPSTREAM_RESET, f"response cannot be forwarded: {readable(str(e))}") from None
                raise UpstreamError(f"response cannot be forwarded: {readable(str(e))}") from None
            started = started or isinstance(event, h11.Response)
            if data:
                try:
                    await self.loop.sock_sendall(conn, data)
                except OSError as e:
                    raise _Cut(Close.CLIENT_ERROR, f"client went away mid-response: {e.strerror}") from None
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
                h11.Response(status_code=status, reason=_phrase(status), headers=headers), h11.Data(data=body),
                h11.EndOfMessage()))
        except h11.LocalProtocolError:  # e.g. the request could not be parsed into a state we answer
            data = _raw_error(status, body, extra or [])
        try:
            await self.loop.sock_sendall(conn, data)
        except OSError:
            pass


_TOO_LARGE_REQUEST = f"request head larger than {MAX_HEAD} bytes"
_TOO_LARGE_RESPONSE = f"response head larger than {MAX_HEAD} bytes"


def _raw_error(status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> bytes:
    head = [b"HTTP/1.1 %d %s" % (status, _phrase(status)), b"content-type: text/plain", b"connection: close",
            b"content-length: " + str(len(body)).encode(), *(n + b": " + v for n, v in extra)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class HttpListener(TcpListener):
    spec: HttpSpec

    def __init__(self, spec: HttpSpec, ctx: Context) -> None:
        super().__init__(spec, ctx)
        self.http = HttpProxy(spec, self.runner)

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        self.runner.handshake(conn, flow, self.http.serve)
