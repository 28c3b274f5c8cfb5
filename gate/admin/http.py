"""The admin listener's HTTP/1.1: one request per connection, parsed by h11, with bounds on what a client
can make us hold; and the small client a worker uses to ask its siblings (gate.admin.siblings).

An admin client is a scraper or an operator's command: a request is a line and a few headers, answered
and closed. Anything else (garbage, a slow or oversized head, too many connections) gets its HTTP error
or a close, and the listener goes on serving.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

__all__ = ["MAX_BODY", "MAX_CONNECTIONS", "MAX_HEAD", "HttpServer", "Request", "Response", "fetch"]

log = logging.getLogger("ugate")

# A request head past this is refused (431): an admin request is a line, a token and a few headers.
MAX_HEAD = 8 * 1024
# No endpoint takes a body (POST /reload has none); a client sending more than this gets 413.
MAX_BODY = 4 * 1024
# An answer the client does not read within this is dropped (a /flows of thousands of flows is a few MB).
WRITE_TIMEOUT = 30.0
# Open admin connections at once: a scraper and an operator need a few; past it new ones are closed at
# once, so a flood of idle connections costs at most this many descriptors.
MAX_CONNECTIONS = 64
# A sibling worker's answer larger than this is dropped: its /flows at max_flows of every listener is
# far below (a flow is ~400 bytes of JSON).
MAX_ANSWER = 64 * 1024 * 1024
# At most this many query parameters: GET /route has eight; more is not a client of ours.
MAX_QUERY_FIELDS = 32


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())

    def encode(self) -> bytes:
        phrase = http.HTTPStatus(self.status).phrase
        head = [f"HTTP/1.1 {self.status} {phrase}", f"content-type: {self.content_type}",
                f"content-length: {len(self.body)}", "connection: close",
                *(f"{k}: {v}" for k, v in self.headers)]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


class BadRequest(Exception):
    """The request cannot be served; ``status`` is the answer (400, 413, 431)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def _request(head: h11.Request) -> Request:
    try:
        target = head.target.decode("ascii")
        parts = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(parts.query, max_num_fields=MAX_QUERY_FIELDS, strict_parsing=False))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(400, f"bad request target: {e}") from None
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in head.headers}
    return Request(head.method.decode("ascii", "replace"), urllib.parse.unquote(parts.path), query, headers)


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request (its body read and dropped, up to MAX_BODY); None when the client closed first."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    head: h11.Request | None = None
    body = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise BadRequest(e.error_status_hint, str(e)) from None
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(16384))
        elif isinstance(event, h11.Request):
            # h11 bounds only a head still incomplete; one that came whole in a read is measured here
            if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > MAX_HEAD:
                raise BadRequest(431, f"request head over {MAX_HEAD} bytes")
            head = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_BODY:
                raise BadRequest(413, f"no endpoint takes a body of more than {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None  # (h11 gives the head first)
            return _request(head)
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:  # PAUSED cannot come before the end of the first request
            raise BadRequest(400, "unexpected input")


Handler = Callable[[Request], Awaitable[Response]]


def error(status: int, message: str) -> Response:
    import json

    return Response(status, json.dumps({"error": message}).encode() + b"\n")


class HttpServer:
    """Serves ``handler`` on a listening socket (TCP or unix), one request per connection."""

    def __init__(self, sock: socket.socket, handler: Handler, name: str, head_timeout: float) -> None:
        """``head_timeout``: the request must arrive within it (408), so a client trickling bytes cannot
        hold a connection (the listener's ``timeouts.handshake``)."""
        self.sock = sock
        self.head_timeout = head_timeout
        self.handler = handler
        self.name = name
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.sock.family == socket.AF_UNIX:
            self.server = await asyncio.start_unix_server(self._serve, sock=self.sock)
        else:
            self.server = await asyncio.start_server(self._serve, sock=self.sock)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self.connections) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self.connections.add(task)
        try:
            await self._answer(reader, writer)
        except (ConnectionError, TimeoutError, OSError):
            pass  # the client went away or stopped reading: nothing to answer
        finally:
            self.connections.discard(task)
            writer.transport.abort() if writer.transport.get_write_buffer_size() else writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.head_timeout):
                request = await read_request(reader)
        except TimeoutError:
            response = error(408, f"no complete request within {self.head_timeout:g}s")
        except BadRequest as e:
            response = error(e.status, str(e))
        else:
            if request is None:
                return
            try:
                response = await self.handler(request)
            except Exception:
                log.exception("%s: %s %s failed", self.name, request.method, request.path)
                response = error(500, "internal error (logged)")
        writer.write(response.encode())
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.gather(*self.connections, return_exceptions=True)


async def fetch(path: str, method: str, target: str, timeout: float) -> tuple[int, bytes]:
    """``method target`` over the unix socket at ``path``: the status and the body (OSError, TimeoutError
    or BadRequest when there is no sound answer)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
            writer.write(conn.send(h11.Request(method=method, target=target, headers=[("host", "ugate")])) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            status, body = 0, bytearray()
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    raise BadRequest(502, f"sibling answered badly: {e}") from None
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_ANSWER:
                        raise BadRequest(502, "sibling's answer too large")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, bytes(body)
        finally:
            writer.transport.abort()
