"""Request/answer exchanges between two gates over their HTTP/2 mesh connection (WebRTC signaling).

One exchange is one CONNECT stream marked with the ``ugate-exchange: KIND`` header: the requester sends
its body and half-closes, the server answers with its body and half-closes. Who sent it is the gate the
connection's mutual TLS authenticated, so what an exchange carries (an offer with its DTLS fingerprint)
is bound to that gate's ID. The bytes move through the same stream bridges as flows (a socketpair end
on each side), so the windows, limits and resets of gate.mesh.session apply unchanged.

Relayed exchanges join two gates that cannot reach each other (both behind NAT) through a third that
both hold tunnels to. The sender marks its exchange ``ugate-relay-to: TARGET-ID``; the relay passes
the body on, unread (only its size is bounded), to its peer with that ID, marked ``ugate-relayed-for:
SENDER-ID`` with the ID the sender's TLS certificate proved (never one the sender states), and hands
the answer back. The relay does so only for a sender whose peer entry lists the target in ``relay:``;
the target takes a relayed exchange only from the gate that the vouched-for peer's ``via_gate`` names.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping

from gate.config import PeerSpec
from gate.errors import ClientProtocolError, GateError, RejectedByRule, UpstreamTimeout, UpstreamUnreachable
from gate.flow import Close
from gate.mesh.peers import Peers
from gate.mesh.session import Session
from gate.mesh.transport import Exchange, Exchanged, Stream, StreamEnd

__all__ = ["EXCHANGE_HEADER", "MAX_BODY", "MAX_RELAYED_BODY", "MAX_RELAYS", "RELAY", "RELAYED_FOR_HEADER",
           "RELAY_TO_HEADER", "Relay", "relay_target", "request", "serve_exchange"]

log = logging.getLogger("ugate")

EXCHANGE_HEADER = "ugate-exchange"
AUTHORITY = "exchange.ugate.invalid:1"  # a CONNECT needs one; never dialled
MAX_BODY = 64 << 10  # either side reads at most this (signaling messages are a few KB)
EXCHANGE_TIMEOUT = 10.0  # for the requester's body to arrive (the server holds a socketpair meanwhile)
RELAY_TO_HEADER = "ugate-relay-to"  # sender -> relay: the gate ID to pass the exchange on to
RELAYED_FOR_HEADER = "ugate-relayed-for"  # relay -> target: the sender's gate ID, as its TLS proved it
RELAY = "relay"  # the relaying handler's key among a gate's exchanges
RELAYED_KINDS = frozenset({"webrtc"})  # what a relay passes on: signaling, nothing else
# A relay passes on signaling messages only (an offer is 1-2 KB; gate.mesh.webrtc.wire.MAX_SIGNAL):
# a larger body is not one, and the relay is not a free pipe between two gates.
MAX_RELAYED_BODY = 16 << 10
# Exchanges one sender has under way through us at once: an offer per peer connection it sets up (the
# offerer sends one at a time per peer) and a few peers at once; more is a flood, refused.
MAX_RELAYS = 8
RELAY_TIMEOUT = 10.0  # for the target's answer (the sender's own deadline usually ends it first)

# (target peer name, kind, body, deadline, sender's gate ID to vouch for) -> the target's answer
RelaySend = Callable[[str, str, bytes, float, str], Awaitable[bytes]]


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
                  refused: Callable[[dict[str, str]], GateError], to: str | None = None,
                  vouch: str | None = None) -> bytes:
    """Send ``body`` to the gate at the far end of ``session`` and return its answer; GateError if not
    (``refused`` maps a non-200 response, as for flows: gate.mesh.h2_streams.error_for_status).
    ``to``: the gate ID that gate is asked to relay it to; ``vouch``: we are the relay, passing on what
    the gate with this ID sent us."""
    headers = [(EXCHANGE_HEADER, kind)]
    if to is not None:
        headers.append((RELAY_TO_HEADER, to))
    if vouch is not None:
        headers.append((RELAYED_FOR_HEADER, vouch))
    try:
        stream_id, answer = session.open_stream(AUTHORITY, headers)
    except Exception as e:  # h2 refuses (e.g. too many streams) or the connection just closed
        raise UpstreamUnreachable(f"{kind} exchange with {peer}: {e}") from None
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


def relay_target(policy: Peers, exchanged: Exchanged, to: str) -> PeerSpec | str:
    """The peer of ours that the sender of ``exchanged`` may have us relay it to, the gate with ID
    ``to``, or why not (said back as a refusal; nothing is relayed by default)."""
    sender = exchanged.peer
    if sender is None:
        return f"gate {exchanged.ident} is not a configured peer"
    if exchanged.kind not in RELAYED_KINDS:
        return f"{exchanged.kind[:32]!r} exchanges are not relayed"
    if exchanged.origin is not None:
        return "a relayed exchange is not relayed again"
    target = policy.by_id(to)
    if target is None:
        return f"no peer here has gate ID {to[:60]}"
    if target.name not in sender.relay:
        return f"peer {sender.name} may not signal to {target.name} through us (its relay: list)"
    return target


def serve_exchange(policy: Peers, ident: str, peer: PeerSpec | None, headers: Mapping[str, str], stream: Stream,
                   exchanges: Mapping[str, Exchange]) -> Callable[[str], None]:
    """Answer one exchange stream with the handler of its kind, or relay it (refused when this gate
    serves no such kind, or may not relay it); returns how to give up on it (the stream was reset
    before it was accepted)."""
    kind, to, origin = headers.get(EXCHANGE_HEADER, ""), headers.get(RELAY_TO_HEADER), headers.get(RELAYED_FOR_HEADER)
    exchanged = Exchanged(kind, ident, peer, origin=origin, origin_peer=policy.by_id(origin) if origin else None)
    handler = exchanges.get(kind) if kind != RELAY else None  # (the relay is asked for by ugate-relay-to)
    if to is not None:
        target = relay_target(policy, exchanged, to)
        handler = exchanges.get(RELAY)
        if isinstance(target, str) or handler is None:
            reason = target if isinstance(target, str) else "this gate relays no exchanges"
            log.warning("mesh: exchange from gate %s not relayed: %s", ident, reason)
            stream.refuse(RejectedByRule(reason))
            return _nothing
        exchanged = Exchanged(kind, ident, peer, to=target)
    if handler is None:
        stream.refuse(RejectedByRule("this gate serves no such exchange"))
        return _nothing
    task = asyncio.get_running_loop().create_task(_serve(exchanged, stream, handler))
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


async def _serve(exchanged: Exchanged, stream: Stream, handler: Exchange) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        if not await stream.accept(theirs, _ignore_end):
            return
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            body = await _read_all(ours, MAX_BODY)
        answer = await handler(exchanged, body)
        await asyncio.get_running_loop().sock_sendall(ours, answer)
        ours.shutdown(socket.SHUT_WR)  # both halves closed: the bridge ends the stream cleanly
    except (GateError, TimeoutError, ConnectionError, OSError) as e:
        log.warning("mesh: exchange from gate %s failed: %s", exchanged.ident, e)
        stream.cancel(Close.CLIENT_RESET)
    finally:
        ours.close()


class Relay:
    """The relaying gate's handler (``exchanges[RELAY]``): passes a permitted exchange (``relay_target``
    checked it before the stream was accepted) on to its target, vouching for the sender, and returns
    the target's answer unchanged."""

    def __init__(self, send: RelaySend) -> None:
        self.send = send
        self.active: dict[str, int] = {}  # sender peer name -> exchanges under way (MAX_RELAYS)

    async def __call__(self, exchanged: Exchanged, body: bytes) -> bytes:
        sender, target = exchanged.peer, exchanged.to
        if sender is None or target is None:  # (serve_exchange passes neither without its checks)
            raise RejectedByRule("not a relayed exchange")
        if len(body) > MAX_RELAYED_BODY:
            raise ClientProtocolError(f"relayed body over {MAX_RELAYED_BODY} bytes")
        if self.active.get(sender.name, 0) >= MAX_RELAYS:
            raise RejectedByRule(f"peer {sender.name} has {MAX_RELAYS} relayed exchanges under way")
        self.active[sender.name] = self.active.get(sender.name, 0) + 1
        try:
            deadline = asyncio.get_running_loop().time() + RELAY_TIMEOUT
            answer = await self.send(target.name, exchanged.kind, body, deadline, exchanged.ident)
        finally:
            self.active[sender.name] -= 1
            if not self.active[sender.name]:
                del self.active[sender.name]
        log.info("mesh: relayed a %s exchange from %s to %s (%d + %d bytes)", exchanged.kind, sender.name,
                 target.name, len(body), len(answer))
        return answer
