"""SOCKS listener: SOCKS5 (RFC 1928, username/password per RFC 1929) CONNECT and UDP ASSOCIATE (served by
``gate.listeners.socks_udp``), and SOCKS4/4a CONNECT.

The wire format is parsed by the pure ``gate.proto.socks``; this module reads bytes, applies
authentication, and maps each failure to the reply code clients show their users.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
from collections.abc import Callable
from typing import Protocol, TypeVar

from gate.addr import Endpoint, is_ip
from gate.config import MuxSpec, Socks5Spec
from gate.context import Context
from gate.errors import (
    ClientProtocolError,
    GateError,
    RefusedByPolicy,
    RejectedByRule,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gate.flow import Flow
from gate.listeners.socks_udp import UdpAssociations
from gate.listeners.tcp import TcpListener
from gate.proto import socks
from gate.proto.socks import NeedMore, Reply, SocksError
from gate.runner import FlowRunner

__all__ = ["Socks", "SocksListener"]


class _Message(Protocol):
    @property
    def consumed(self) -> int: ...


T = TypeVar("T", bound=_Message)


def socks5_code(error: GateError) -> Reply:
    """The SOCKS5 reply for a failed CONNECT; a timeout reads as unreachable, as in Dante and 3proxy."""
    if isinstance(error, (RejectedByRule, RefusedByPolicy)):
        return Reply.NOT_ALLOWED
    if isinstance(error, UpstreamRefused):
        return Reply.CONNECTION_REFUSED
    if isinstance(error, (UpstreamUnreachable, UpstreamTimeout)):
        return Reply.HOST_UNREACHABLE
    return Reply.GENERAL_FAILURE


class Socks:
    """The SOCKS handshake and its answers, for the ``socks5`` listener and the ``mux`` one."""

    def __init__(self, spec: Socks5Spec | MuxSpec, runner: FlowRunner) -> None:
        self.spec = spec
        self.runner = runner
        self.loop = runner.loop
        self.udp = UdpAssociations(spec.name, spec.udp, runner.ctx, runner.opener, spec.timeouts.idle,
                                   spec.timeouts.sniff)

    async def serve(self, conn: socket.socket, flow: Flow) -> None:
        buf = bytearray(flow.preread)  # bytes a mux listener read while sniffing
        flow.preread = b""
        async with asyncio.timeout(self.spec.timeouts.handshake):
            first: socks.Greeting | socks.Socks4Request = await self._read(conn, buf, socks.parse_first)
            if isinstance(first, socks.Socks4Request):
                if self.spec.users:  # SOCKS4 has no passwords: allowing it would bypass authentication
                    await self.loop.sock_sendall(conn, socks.socks4_reply(False))
                    raise ClientProtocolError("SOCKS4 refused: this listener requires authentication")
                host, port, success, failure = first.host, first.port, socks.socks4_reply(True), None
            else:
                await self._negotiate(conn, buf, first)
                request = await self._read(conn, buf, socks.parse_request)
                host, port, success, failure = request.host, request.port, None, socks5_code
        flow.dst = Endpoint(host, port)
        if isinstance(first, socks.Greeting) and request.command == socks.UDP_ASSOCIATE:
            await self._associate(conn, flow, buf, request)
            return
        flow.host = None if is_ip(host) else host.lower()
        flow.preread = bytes(buf)  # an optimistic client may send data before our reply
        if self.runner.sniffs_in_tunnel(flow):
            await self._connect_after_sniffing(conn, flow, success or socks.socks5_reply(Reply.SUCCEEDED))
            return
        try:
            upstream = await self.runner.connect(flow)
        except GateError as e:
            reply = socks.socks4_reply(False) if failure is None else socks.socks5_reply(failure(e))
            await self.loop.sock_sendall(conn, reply)
            raise
        if success is None:
            # a tunnelled flow's upstream is a socketpair: no address of ours to tell
            sock = upstream.sock
            bound = sock.getsockname() if sock.family != socket.AF_UNIX else ("0.0.0.0", 0)
            success = socks.socks5_reply(Reply.SUCCEEDED, bound[0], bound[1])
        try:
            await self.loop.sock_sendall(conn, success)
        except BaseException:
            upstream.sock.close()
            raise
        await self.runner.relay(conn, flow, upstream)

    async def _associate(self, conn: socket.socket, flow: Flow, buf: bytearray, request: socks.Socks5Request) -> None:
        """UDP ASSOCIATE (granted only after authentication): the control connection carries no bytes
        of its own; the association lives as long as it does."""
        if not self.spec.udp.enabled:
            await self.loop.sock_sendall(conn, socks.socks5_reply(Reply.COMMAND_NOT_SUPPORTED))
            raise ClientProtocolError("UDP ASSOCIATE is disabled on this listener (udp.enabled: false)")
        flow.path = "udp-associate"
        flow.preread = bytes(buf)
        await self.udp.serve(conn, flow, request)

    async def _connect_after_sniffing(self, conn: socket.socket, flow: Flow, success: bytes) -> None:
        """A route depends on what the client says inside the tunnel, and it says nothing before our
        reply: so "succeeded" goes first (bound address 0.0.0.0:0), then sniffing, routing and the
        connection. Its cost: a refused or unreachable upstream can only be told by a reset."""
        await self.loop.sock_sendall(conn, success)
        await self.runner.sniff_tunnel(conn, flow)
        await self.runner.connect_and_relay_or_reset(conn, flow)

    async def _negotiate(self, conn: socket.socket, buf: bytearray, greeting: socks.Greeting) -> None:
        """Pick the method (username/password if users are configured) and authenticate."""
        method = socks.USERPASS if self.spec.users else socks.NO_AUTH
        if method not in greeting.methods:
            await self.loop.sock_sendall(conn, socks.method_reply(socks.NO_ACCEPTABLE))
            raise ClientProtocolError("no acceptable SOCKS5 authentication method")
        await self.loop.sock_sendall(conn, socks.method_reply(method))
        if method == socks.USERPASS:
            creds = await self._read(conn, buf, socks.parse_credentials)
            expected = self.spec.users.get(creds.username)
            ok = expected is not None and hmac.compare_digest(expected.encode(), creds.password.encode())
            await self.loop.sock_sendall(conn, socks.auth_reply(ok))
            if not ok:
                raise ClientProtocolError(f"SOCKS5 authentication failed for {creds.username!r}")

    async def _read(self, conn: socket.socket, buf: bytearray, parse: Callable[[bytes], T | NeedMore]) -> T:
        """Read until ``parse`` has a whole message at the head of ``buf``; consume it."""
        while True:
            try:
                result = parse(bytes(buf))
            except SocksError as e:
                if e.reply:
                    await self.loop.sock_sendall(conn, e.reply)
                raise ClientProtocolError(f"bad SOCKS handshake: {e}") from None
            if not isinstance(result, NeedMore):
                del buf[: result.consumed]
                return result
            data = await self.loop.sock_recv(conn, 4096)
            if not data:
                raise ClientProtocolError("client closed during the SOCKS handshake")
            buf += data


class SocksListener(TcpListener):
    spec: Socks5Spec

    def __init__(self, spec: Socks5Spec, ctx: Context) -> None:
        super().__init__(spec, ctx)
        self.socks = Socks(spec, self.runner)

    def accepted(self, conn: socket.socket, flow: Flow) -> None:
        self.runner.handshake(conn, flow, self.socks.serve)
