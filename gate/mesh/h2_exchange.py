"""Request/answer exchanges between two gates over their HTTP/2 mesh connection (WebRTC signaling).

One exchange is one CONNECT stream marked with the ``ugate-exchange: KIND`` header: the requester sends
its body and half-closes, the server answers with its body and half-closes. Who sent it is the gate the
connection's mutual TLS authenticated, so what an exchange carries (an offer with its DTLS fingerprint)
is bound to that gate's ID. The bytes move through the same stream bridges as flows (a socketpair end
on each side), so the windows, limits and resets of gate.mesh.session apply unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable

from gate.config import PeerSpec
from gate.errors import ClientProtocolError, GateError, RejectedByRule, UpstreamTimeout, UpstreamUnreachable
from gate.flow import Close
from gate.mesh.session import Session
from gate.mesh.transport import Exchange, Stream, StreamEnd

__all__ = ["EXCHANGE_HEADER", "MAX_BODY", "request", "serve_exchange"]

log = logging.getLogger("ugate")

EXCHANGE_HEADER = "ugate-exchange"
AUTHORITY = "exchange.ugate.invalid:1"  # a CONNECT needs one; never dialled
MAX_BODY = 64 << 10  # either side reads at most this (signaling messages are a few KB)
EXCHANGE_TIMEOUT = 10.0  # for the requester's body to arrive (the server holds a socketpair meanwhile)


async def _read_all(sock: socket.socket, limit: int) -> bytes:
    """Bytes until EOF; ClientProtocolError past ``limit``."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 65536):
        data += chunk
        if len(data) > limit:
            raise ClientProtocolError(f"exchange body over {limit} bytes")
    return bytes(data)


async def request(session: Session, peer: str, kind: str, body: bytes, deadline: float,
                  refused: Callable[[dict[str, str]], GateError]) -> bytes:
    """Send ``body`` to the gate at the far end of ``session`` and return its answer; GateError if not
    (``refused`` maps a non-200 response, as for flows: gate.mesh.h2_streams.error_for_status)."""
    stream_id, answer = session.open_stream(AUTHORITY, [(EXCHANGE_HEADER, kind)])
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    attached = False
    try:
        async with asyncio.timeout_at(deadline):
            response = await answer
            if response.get(":status") != "200":
                raise refused(response)
            await session.attach(stream_id, theirs)
            attached = True
            await asyncio.get_running_loop().sock_sendall(ours, body)
            ours.shutdown(socket.SHUT_WR)
            return await _read_all(ours, MAX_BODY)
    except TimeoutError:
        raise UpstreamTimeout(f"{kind} exchange with {peer}: no answer in time") from None
    except (ConnectionError, OSError) as e:
        raise UpstreamUnreachable(f"{kind} exchange with {peer}: {e}") from None
    finally:
        ours.close()
        if not attached:
            theirs.close()
            session.discard(stream_id)


def serve_exchange(ident: str, peer: PeerSpec | None, stream: Stream,
                   handler: Exchange | None) -> Callable[[str], None]:
    """Answer one exchange stream with ``handler`` (refused when this gate serves no such kind);
    returns how to give up on it (the stream was reset before it was accepted)."""
    if handler is None:
        stream.refuse(RejectedByRule("this gate serves no such exchange"))
        return _nothing
    task = asyncio.get_running_loop().create_task(_serve(ident, peer, stream, handler))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return functools.partial(_cancel, task)


_tasks: set[asyncio.Task[None]] = set()  # (asyncio keeps only weak references to tasks)


def _cancel(task: asyncio.Task[None], _reason: str) -> None:
    task.cancel()


def _nothing(_reason: str) -> None:
    pass


def _ignore_end(_end: StreamEnd) -> None:
    pass


async def _serve(ident: str, peer: PeerSpec | None, stream: Stream, handler: Exchange) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        if not await stream.accept(theirs, _ignore_end):
            return
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            body = await _read_all(ours, MAX_BODY)
        answer = await handler(ident, peer, body)
        await asyncio.get_running_loop().sock_sendall(ours, answer)
        ours.shutdown(socket.SHUT_WR)  # both halves closed: the bridge ends the stream cleanly
    except (GateError, TimeoutError, ConnectionError, OSError) as e:
        log.warning("mesh: exchange from gate %s failed: %s", ident, e)
        stream.cancel(Close.CLIENT_RESET)
    finally:
        ours.close()
