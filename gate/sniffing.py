"""Reading a flow's first bytes to classify it before routing, within a bounded wait.

Callback-driven, like the rest of the handshake-free path: the client socket is watched until
``sniff.classify`` has an answer, MAX_SNIFF bytes arrived, or the wait ran out (a server-first
protocol such as SMTP sends nothing until the server speaks: such flows are routed on addresses
alone, never held longer). The bytes read become the flow's preread, delivered upstream first.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable

from gate.addr import Endpoint
from gate.deadlines import Sweeper
from gate.flow import Close, Flow
from sniff import MAX_SNIFF, NeedMore, NotThisProtocol, Sniffed, classify, proxy_protocol

__all__ = ["FirstBytes", "ProxyHeaderReader", "SniffOutcomes", "apply_sniffed", "sniff_at_once"]


class SniffOutcomes(collections.Counter[str]):
    """How sniffing ended, counted for the metrics: a hit per protocol (tls, http, quic, ...), "miss"
    (bytes came that no sniffer recognised, or too many to decide), "timeout" (nothing decisive within
    the wait: routed on addresses alone), "empty" (the client half-closed before sending a byte)."""

    def record(self, flow: Flow, timed_out: bool = False) -> None:
        if timed_out:
            self["timeout"] += 1
        elif flow.protocol == "unknown":
            self["miss"] += 1
        elif flow.protocol == "none":
            self["empty"] += 1
        elif flow.protocol is not None:
            self[flow.protocol] += 1


def sniff_at_once(conn: socket.socket, flow: Flow) -> bool | None:
    """One non-blocking read right at accept, since a fast client's first bytes are often there
    already: True when that settled the protocol (``flow.preread`` holds the bytes), None when more
    must be waited for (the bytes so far are in ``flow.preread``), False when the client broke off."""
    try:
        data = flow.preread + conn.recv(MAX_SNIFF - len(flow.preread))  # after a PROXY header, maybe
    except (BlockingIOError, InterruptedError):
        if not flow.preread:
            return None
        data = flow.preread
    except OSError as e:
        flow.closing(Close.CLIENT_ERROR, f"while sniffing: {e.strerror}")
        return False
    flow.preread = data
    if not data:
        flow.protocol = "none"
        return True
    found = classify(data)
    if isinstance(found, NeedMore):
        return None
    apply_sniffed(flow, found)
    return True


def park(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Keep the fd's poll registration for the relay that comes next (uvloop drops and re-creates its
    poll handle on remove + add, a cost per flow) with a callback that only drops it if the client
    speaks again first. Whoever closes the socket before a relay starts must remove_reader."""
    loop.add_reader(fd, loop.remove_reader, fd)


def apply_sniffed(flow: Flow, found: Sniffed) -> None:
    """What sniffing found, into the flow (a name the client asked for stays the flow's host)."""
    flow.protocol, flow.sni, flow.alpn, flow.ech = found.protocol, found.sni, found.alpn, found.ech
    if flow.host is None and found.host:
        flow.host = found.host


class _Watch:
    """Reads one client socket until its subclass has what it waits for, at most until a deadline kept
    by a shared sweeper; calls ``done(ok)`` once (ok False: the client broke off or sent nonsense)."""

    __slots__ = ("_buf", "_conn", "_deadline", "_done", "_fd", "_loop", "_sweeper", "flow")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, flow: Flow, wait: float,
                 sweeper: Sweeper, done: Callable[[bool], None], buf: bytes = b"") -> None:
        self._loop, self._conn, self._fd, self.flow = loop, conn, conn.fileno(), flow
        self._buf = buf
        self._deadline = loop.time() + wait
        self._sweeper = sweeper
        self._done: Callable[[bool], None] | None = done
        loop.add_reader(self._fd, self._readable)
        sweeper.add(self)

    def deadline(self) -> float:
        return self._deadline

    def expire(self) -> None:
        raise NotImplementedError

    def _readable(self) -> None:
        raise NotImplementedError

    def _stop(self, keep_registration: bool = False) -> Callable[[bool], None] | None:
        """Stop watching; the ``done`` still owed (None when it was called or cancelled already). With
        ``keep_registration`` the fd stays registered with the loop: the caller parks it (see ``park``)."""
        done, self._done = self._done, None
        if done is not None:
            if not keep_registration:
                self._loop.remove_reader(self._fd)
            self._sweeper.discard(self)
        return done

    def cancel(self) -> None:
        """Shutdown: stop watching; ``done`` is not called."""
        self._stop()


class FirstBytes(_Watch):
    """Waits for enough of a flow's first bytes to classify it (``sniff.classify``)."""

    __slots__ = ("timed_out",)

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, flow: Flow, wait: float,
                 sweeper: Sweeper, done: Callable[[bool], None]) -> None:
        self.timed_out = False
        # starts with what sniff_at_once read already; bytes, not a bytearray: one read usually settles
        # it, and b"" + data is data itself, so nothing is copied on the way to classify and the preread
        super().__init__(loop, conn, flow, wait, sweeper, done, flow.preread)

    def expire(self) -> None:
        """Nothing (or not enough) said in time: route on what we have."""
        self.timed_out = True
        self.flow.protocol = "unknown" if self._buf else "none"
        self._finish(True)

    def _readable(self) -> None:
        try:
            data = self._conn.recv(MAX_SNIFF - len(self._buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.flow.closing(Close.CLIENT_ERROR, f"while sniffing: {e.strerror}")
            self._finish(False)
            return
        if not data:  # half-closed before saying (all) it had: route with what came
            self.flow.protocol = "unknown" if self._buf else "none"
            self._finish(True)
            return
        self._buf += data
        found = classify(self._buf)
        if isinstance(found, NeedMore) and len(self._buf) < MAX_SNIFF:
            return
        apply_sniffed(self.flow, found if isinstance(found, Sniffed) else Sniffed("unknown"))
        self._finish(True)

    def _finish(self, ok: bool) -> None:
        done = self._stop(keep_registration=ok)
        if done is None:
            return
        if ok:
            park(self._loop, self._fd)  # the registration stays for the relay that comes next
        self.flow.preread = self._buf
        done(ok)


class ProxyHeaderReader(_Watch):
    """Reads the PROXY protocol header a trusted load balancer opens with; the real client replaces
    ``flow.client`` and the bytes after the header become ``flow.preread``."""

    __slots__ = ()

    def expire(self) -> None:
        self.flow.closing(Close.HANDSHAKE_TIMEOUT, "no PROXY protocol header in time")
        self._finish(False)

    def _readable(self) -> None:
        try:
            data = self._conn.recv(proxy_protocol.V2_MAX + 16 - len(self._buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.flow.closing(Close.CLIENT_ERROR, e.strerror)
            self._finish(False)
            return
        self._buf += data
        try:
            header = proxy_protocol.parse_proxy_header(self._buf) if data else None
        except NotThisProtocol as e:
            self.flow.closing(Close.CLIENT_ERROR, f"bad PROXY protocol header: {e}")
            self._finish(False)
            return
        if header is None:
            self.flow.closing(Close.CLIENT_ERROR, "closed before a PROXY protocol header")
            self._finish(False)
        elif isinstance(header, proxy_protocol.ProxyHeader):
            if header.source is not None:
                self.flow.client = Endpoint(*header.source)
            self.flow.hops = header.hops
            self.flow.preread = self._buf[header.consumed :]
            self._finish(True)

    def _finish(self, ok: bool) -> None:
        done = self._stop()
        if done is not None:
            done(ok)
