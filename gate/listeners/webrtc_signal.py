"""Signaling for browser peers (``webrtc_signal``): one HTTP/1.1 request per connection, a POSTed WebRTC
offer answered with the gate's answer (application/sdp or JSON, as the offer came), CORS for the page
origins configured. The browser's channels then run as flows of this listener (gate.mesh.webrtc.browser).

Who may signal is decided before the body is read: the bearer token (compared in constant time), the
source allow list, the page's Origin. Each signaling request is one access-log record (``done`` when
answered); each channel's flow is another, with this listener's name, so routes can tell them apart.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11

from gate.addr import Endpoint
from gate.context import Context
from gate.control_specs import WebrtcSignalSpec
from gate.errors import ClientProtocolError, HandshakeTimeout
from gate.flow import Close, Flow
from gate.listeners.tcp import TcpListener
from gate.proto.http import readable
from gate.runner import FlowRunner
from tproxy.sockopts import unmap

if TYPE_CHECKING:
    from gate.mesh.webrtc.browser import BrowserPeers

__all__ = ["MAX_HEAD", "WebrtcSignalListener"]

log = logging.getLogger("ugate")
MAX_HEAD = 8 << 10  # a browser's POST head with a token and CORS headers is well under 2 KB
RECV_SIZE = 64 << 10


def _cut(flow: Flow) -> None:
    """End a relaying flow now; one not relaying yet ends with its socket (already reset)."""
    if flow.relay is not None:
        flow.relay.abort("client reset")


class _Answer(Exception):
    """End the request with this HTTP status (and log the flow with ``close``)."""

    def __init__(self, status: int, reason: str, close: Close = Close.CLIENT_ERROR,
                 extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(reason)
        self.status, self.reason, self.close, self.extra = status, reason, close, extra


class WebrtcSignalListener(TcpListener):
    spec: WebrtcSignalSpec

    def __init__(self, spec: WebrtcSignalSpec, ctx: Context) -> None:
        super().__init__(spec, ctx)
        # The channels' flows have a runner of their own: they are not connections the accept loop
        # counted, and must not hold up its max_flows (the signaling requests).
        self.tunnels = FlowRunner(spec, ctx)
        self.peers: BrowserPeers | None = None
        self._token = spec.token.encode()

    def start(self) -> None:
        # aiortc (and PyAV under it) is loaded only by the configs that use WebRTC
        from gate.mesh.webrtc.browser import BrowserLimits, BrowserPeers

        self.peers = BrowserPeers(BrowserLimits(self.spec.max_peers, self.spec.max_peers_per_source,
                                                self.spec.ice_timeout, self.spec.peer_idle, self.spec.max_flows),
                                  self._flow)
        super().start()

    def _flow(self, sock: socket.socket, client: Endpoint, dst: Endpoint) -> Callable[[], None]:
        flow = Flow(listener=self.spec.name, client=client, dst=dst)
        self.tunnels.forward(sock, flow)
        return functools.partial(_cut, flow)

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        self.runner.handshake(conn, flow, self._serve)

    # -- one request ---------------------------------------------------------------------------------

    async def _serve(self, conn: socket.socket, flow: Flow) -> None:
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        origin = b""
        try:
            async with asyncio.timeout(self.spec.timeouts.handshake):
                request = await self._next(conn, http)
                if not isinstance(request, h11.Request):  # (h11 gives a request first, or an error)
                    raise ClientProtocolError("no request head")
                headers = {name.lower(): value for name, value in request.headers}
                origin = headers.get(b"origin", b"")
                status, body, ctype = await self._answer(conn, http, request, headers, flow)
        except _Answer as e:
            flow.closing(e.close, f"{e.status} {e.reason}")
            await self._send(conn, e.status, e.reason.encode() + b"\n", b"text/plain", origin, e.extra)
            return
        except TimeoutError:
            raise HandshakeTimeout("signaling request not received in time") from None
        flow.closing(Close.DONE, "answered" if status == 200 else None)
        await self._send(conn, status, body, ctype, origin)

    async def _answer(self, conn: socket.socket, http: h11.Connection, request: h11.Request,
                      headers: dict[bytes, bytes], flow: Flow) -> tuple[int, bytes, bytes]:
        """Status, body and content type for an allowed request; _Answer for any other."""
        if request.target.split(b"?")[0].decode("ascii", "replace") != self.spec.path:
            raise _Answer(404, "no such path")
        origin = headers.get(b"origin")
        if origin is not None and not self._origin_allowed(origin):
            raise _Answer(403, "page origin not allowed", Close.REJECTED)
        if request.method == b"OPTIONS":  # a CORS preflight: only the allowed origin was checked
            return 204, b"", b"text/plain"
        if request.method != b"POST":
            raise _Answer(405, "only POST", extra=((b"allow", b"POST, OPTIONS"),))
        self._authorise(headers, flow)
        sdp, as_json = await self._offer(conn, http, headers)
        assert self.peers is not None
        from gate.mesh.webrtc.browser import PeersFull, answer_body
        from gate.mesh.webrtc.wire import SignalError

        try:
            answer = await self.peers.answer(sdp, flow.client)
        except PeersFull as e:
            raise _Answer(e.status, str(e), Close.REFUSED) from None
        except SignalError as e:
            raise _Answer(400, str(e)) from None
        body, ctype = answer_body(answer, as_json)
        return 200, body, ctype.encode()

    def _origin_allowed(self, origin: bytes) -> bool:
        text = origin.decode("ascii", "replace").rstrip("/")
        return "*" in self.spec.origins or text in self.spec.origins

    def _authorise(self, headers: dict[bytes, bytes], flow: Flow) -> None:
        """The source allow list and the bearer token, whichever are configured (both if both are)."""
        if self.spec.allow_from:
            try:
                address = ipaddress.ip_address(unmap(flow.client.host))
            except ValueError:
                address = None
            if address is None or not any(address in net for net in self.spec.allow_from):
                raise _Answer(403, "source not allowed", Close.REJECTED)
        if self._token:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            # compare_digest takes as long whatever the bytes: a wrong guess tells nothing of the token
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
                raise _Answer(401, "bearer token missing or wrong", Close.REJECTED,
                              ((b"www-authenticate", b'Bearer realm="ugate"'),))

    async def _offer(self, conn: socket.socket, http: h11.Connection,
                     headers: dict[bytes, bytes]) -> tuple[str, bool]:
        from gate.mesh.webrtc.browser import offer_of
        from gate.mesh.webrtc.wire import SignalError

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.spec.max_offer:
            raise _Answer(413, f"offer over {self.spec.max_offer} bytes")
        body = bytearray()
        while True:
            event = await self._next(conn, http)
            if isinstance(event, h11.EndOfMessage):
                break
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.spec.max_offer:  # (chunked bodies have no length up front)
                    raise _Answer(413, f"offer over {self.spec.max_offer} bytes")
        try:
            return offer_of(bytes(body), headers.get(b"content-type", b"").decode("latin-1"))
        except SignalError as e:
            raise _Answer(415 if "must be" in str(e) else 400, str(e)) from None

    async def _next(self, conn: socket.socket, http: h11.Connection) -> h11.Request | h11.Data | h11.EndOfMessage:
        loop = asyncio.get_running_loop()
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as e:
                raise _Answer(e.error_status_hint, readable(str(e))) from None
            if event is h11.NEED_DATA:
                data = await loop.sock_recv(conn, RECV_SIZE)
                http.receive_data(data)
                continue
            if isinstance(event, (h11.Request, h11.Data, h11.EndOfMessage)):
                return event
            raise ClientProtocolError("client closed before its request was complete")

    async def _send(self, conn: socket.socket, status: int, body: bytes, ctype: bytes,
                    origin: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                   (b"cache-control", b"no-store"), *extra]
        if origin and self._origin_allowed(origin):
            headers += [(b"access-control-allow-origin", origin), (b"vary", b"Origin"),
                        (b"access-control-allow-methods", b"POST, OPTIONS"),
                        (b"access-control-allow-headers", b"authorization, content-type"),
                        (b"access-control-max-age", b"600")]
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b""
        head = b"HTTP/1.1 %d %s\r\n" % (status, phrase) + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        try:
            await asyncio.get_running_loop().sock_sendall(conn, head + b"\r\n" + body)
        except OSError:
            pass

    # -- the end -------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        super().stop_accepting()
        if self.peers is not None:
            self.peers.accepting = False

    async def drain(self, timeout: float) -> None:
        await asyncio.gather(super().drain(timeout), self.tunnels.drain(timeout))
        if self.peers is not None:
            await self.peers.aclose()

