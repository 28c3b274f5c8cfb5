"""The running gate's listeners, routes, peers and capture rules, and how a re-read config replaces them
without dropping flows (SIGHUP, the admin API's POST /reload: both call ``reload()``).

A new config is validated whole (what ``ugate check`` loads) before anything changes; a bad one is refused
with its located problems and the running one stays. Then: new addresses are bound (a failure refuses the
reload with nothing changed), the capture rules are replaced in one nftables transaction, peers are added,
removed or re-keyed, the router is swapped in one assignment (open flows keep the decision they made; new
flows see the new routes), and listeners are compared by name: an unchanged spec keeps its listener, its
socket and its flows; a changed one is rebuilt on the very same listening socket when its address stays
(the backlog is kept: nothing queued is refused or reset), or on a new socket bound before the old one
closes; a removed one stops accepting and drains its flows for ``timeouts.drain``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gate.accept import bind_listening_socket
from gate.accesslog import AccessLog
from gate.addr import Endpoint
from gate.capture import Captured
from gate.config import GateConfig, H2Spec, ListenerSpec, load_config
from gate.context import Context
from gate.errors import ConfigError
from gate.handoff import LISTENING
from gate.listeners import SERVERS, Server, make_listener
from gate.router import Router
from gate.sdnotify import Notifier
from gate.upgrade import HandoffServer, confirm
from gate.vocab import Transport

__all__ = ["Gateway", "Lifecycle", "ListenerPlan", "current", "plan_listeners", "reload", "restart_needed",
           "supervisor_reload"]

log = logging.getLogger("ugate")


@dataclass(frozen=True)
class ListenerPlan:
    """What a reload does to the listeners, by name (a pure comparison of two configs)."""

    keep: tuple[str, ...]  # same spec: listener, socket and flows untouched
    start: tuple[str, ...]  # new or changed: a listener built from the new spec
    retire: tuple[str, ...]  # removed or changed: stops accepting, drains its flows
    # new listener -> the retiring one whose listening socket it takes over (same address, both TCP)
    handover: tuple[tuple[str, str], ...] = ()
    # retiring UDP listeners whose address a new one binds: they must let go of the port first
    stop_first: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.start or self.retire)


def plan_listeners(old: Sequence[ListenerSpec], new: Sequence[ListenerSpec],
                   rebuild: frozenset[str] = frozenset()) -> ListenerPlan:
    """Compare listener specs by name; ``rebuild`` names listeners to rebuild even if their spec is the
    same (h2 listeners when the peers change: their TLS context holds the trust anchors)."""
    before = {spec.name: spec for spec in old}
    after = {spec.name: spec for spec in new}
    keep = tuple(n for n, spec in after.items() if before.get(n) == spec and n not in rebuild)
    start = tuple(n for n in after if n not in keep)
    retire = tuple(n for n in before if n not in keep)
    handover: list[tuple[str, str]] = []
    stop_first: list[str] = []
    for name in start:
        spec = after[name]
        for gone in retire:
            was = before[gone]
            if was.listen != spec.listen or was.transport != spec.transport:
                continue
            if spec.transport is Transport.TCP and _transparent(was) == _transparent(spec):
                handover.append((name, gone))
            else:  # a UDP port, or a socket that would need IP_TRANSPARENT added or removed
                stop_first.append(gone)
    return ListenerPlan(keep, start, retire, tuple(handover), tuple(stop_first))


def _transparent(spec: ListenerSpec) -> bool:
    return bool(getattr(SERVERS[type(spec)], "transparent", False))


def restart_needed(old: GateConfig, new: GateConfig) -> list[str]:
    """What a reload cannot change in a running process (located like config problems)."""
    problems = []
    if (new.capture is not None and new.capture.apply == "auto"
            and (old.capture is None or old.capture.apply != "auto")):
        problems.append("capture.apply: rules applied by the gate are installed at start: a restart adds them")
    if new.workers != old.workers:
        problems.append(f"config.workers: {old.workers} -> {new.workers} needs a restart (the processes are forked "
                        "at start)")
    if new.mesh != old.mesh:
        problems.append("mesh: this gate's identity and mesh settings change only with a restart")
    before = {p.name: p for p in old.peers}
    for i, peer in enumerate(new.peers):
        was = before.pop(peer.name, None)
        if peer != was and (peer.reverse or "webrtc" in peer.transports):
            problems.append(f"peers[{i}] ({peer.name}): reverse and WebRTC peers change only with a restart")
    for name, was in before.items():
        if was.reverse or "webrtc" in was.transports:
            problems.append(f"peers ({name}): removing a reverse or WebRTC peer needs a restart")
    return problems


class Gateway:
    """One process's running listeners and what they share; ``reload`` replaces them from the config file.

    ``rules`` (with ``capture.apply: auto``, in the process that owns the capture rules) replaces them;
    a forked worker has none: its supervisor replaces the rules before it passes SIGHUP on.
    """

    def __init__(self, config: GateConfig, ctx: Context, life: Lifecycle | None = None) -> None:
        self.config = config
        self.ctx = ctx
        self.life = life or Lifecycle()
        self.source = self.life.source
        self.rules = self.life.captured.replace if self.life.captured is not None else None
        self.notifier = self.life.notifier or Notifier("")
        self.handoff: HandoffServer | None = None
        self.listeners: dict[str, Server] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.reloads = 0  # succeeded
        self.failed_reloads = 0
        self._watchdog: asyncio.TimerHandle | None = None

    # -- running -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every listener (taking over inherited sockets), then tell the service manager."""
        global _current
        for spec in self.config.listeners:
            self.listeners[spec.name] = self._start(spec)
        for address in LISTENING.close_unclaimed():
            log.warning("an inherited listening socket on %s has no listener in the config: closed", address)
        _current = self

    def begin(self, stop: asyncio.Event) -> None:
        """Once the listeners run: SIGHUP reloads, SIGUSR1 re-opens the access log (logrotate); the gate we
        took over from is told to stop; the handoff path is served for the next upgrade."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.on_sighup)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_log)
        if self.life.predecessor is not None:
            confirm(self.life.predecessor)
            self.life.predecessor = None
        if self.life.handoff is not None:
            self.handoff = HandoffServer(self.life.handoff, self.listening_sockets, lambda: self._handed(stop))
            self.handoff.start()

    def listening_sockets(self) -> list[socket.socket]:
        """The TCP listening sockets, for a successor (UDP ports are not passed: see the README)."""
        found = []
        for listener in self.listeners.values():
            acceptor = getattr(listener, "acceptor", None)
            if acceptor is not None and acceptor.sock is not None:
                found.append(acceptor.sock)
        return found

    def _handed(self, stop: asyncio.Event) -> None:
        if self.life.captured is not None:
            self.life.captured.keep = True  # the successor applied the same table; clearing it would undo that
        stop.set()

    def reopen_log(self) -> None:
        try:
            self.ctx.access_log.reopen()
        except OSError as e:  # e.g. the directory is gone: keep serving, writing to the old file
            log.error("cannot re-open the access log: %s", e)
        else:
            log.info("access log re-opened")

    def ready(self, status: str) -> None:
        self.notifier.ready(status)
        self._ping()

    def _ping(self) -> None:
        from gate.sdnotify import watchdog_interval

        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            self.notifier.watchdog()  # from the event loop: a loop stuck for WatchdogSec gets the gate restarted
            self._watchdog = asyncio.get_running_loop().call_later(interval, self._ping)

    def _start(self, spec: ListenerSpec) -> Server:
        listener = make_listener(spec, self.ctx)
        listener.start()
        return listener

    def stop_accepting(self) -> None:
        global _current
        _current = None
        self.notifier.stopping()
        if self.handoff is not None:
            self.handoff.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for listener in self.listeners.values():
            listener.stop_accepting()

    async def drain(self, timeout: float) -> None:
        await asyncio.gather(*(listener.drain(timeout) for listener in self.listeners.values()),
                             *self._retiring)

    def _retire(self, name: str, listener: Server) -> None:
        listener.stop_accepting()
        task = asyncio.get_running_loop().create_task(listener.drain(self.config.timeouts.drain))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("listener %s stopped accepting; draining its flows for up to %gs", name, self.config.timeouts.drain)

    # -- reloading ---------------------------------------------------------------------------------

    def on_sighup(self) -> None:
        """A reload, and the access log re-opened whatever its outcome: logrotate configs written for the
        gate before SIGHUP meant reload (and nginx's habit) send SIGHUP after rotating."""
        self.reload()
        self.reopen_log()

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file and apply it; (False, why) leaves the running config as it was."""
        self.notifier.reloading()
        began = time.perf_counter()
        try:
            ok, message = self._reload()
        except OSError as e:  # binding, nft, netlink: nothing of the new config was applied
            ok, message = False, f"reload failed: {e}"
        if ok:
            self.reloads += 1
            message += f" in {(time.perf_counter() - began) * 1000:.0f} ms"
            log.info("reloaded: %s", message)
        else:
            self.failed_reloads += 1
            log.error("reload refused, the running config stays: %s", message)
        self.notifier.ready(f"reload {'ok' if ok else 'refused'}: {message}"[:200])
        return ok, message

    def _load(self) -> GateConfig:
        if self.source is None:
            raise ConfigError(["this gate was started without a config file to re-read"])
        from gate.preflight import preflight

        new = load_config(self.source)
        problems = preflight(new) + restart_needed(self.config, new)
        if problems:
            raise ConfigError(problems)
        return new

    def _reload(self) -> tuple[bool, str]:
        try:
            new = self._load()
        except ConfigError as e:
            for problem in e.problems:
                log.error("%s: %s", self.source, problem)
            return False, "; ".join(e.problems)
        old = self.config
        peers_changed = new.peers != old.peers
        rebuild = frozenset(s.name for s in new.listeners if isinstance(s, H2Spec)) if peers_changed else frozenset()
        plan = plan_listeners(old.listeners, new.listeners, rebuild)
        specs = {spec.name: spec for spec in new.listeners}
        freed = {spec.listen for spec in old.listeners if spec.name in plan.stop_first}
        prebound = self._prebind([specs[n] for n in plan.start if n not in dict(plan.handover)], freed)
        try:
            if self.rules is not None and _capture_changed(old, new):
                self.rules(new)  # one nftables transaction (gate.capture.Captured.replace)
        except OSError:
            for sock in prebound:
                LISTENING.discard(sock)
            raise
        peer_change = self._update_peers(new) if peers_changed else ""
        # one assignment each: a flow routed from now on sees the new routes; open flows keep their decision
        self.ctx.router = Router(new.routes)
        self.ctx.config = new  # what the admin API's /config and /route read
        self.ctx.own = frozenset(spec.listen for spec in new.listeners)
        self.ctx.mark = new.mark
        self._swap_access_log(old, new)
        if new.log.level != old.log.level:
            logging.getLogger().setLevel(new.log.level.upper())
        self.config = new
        self._apply(plan, specs)
        words = [f"{len(new.listeners)} listeners ({len(plan.keep)} kept, {len(plan.start)} started, "
                 f"{len(plan.retire)} retired)", f"{len(new.routes)} routes"]
        if peer_change:
            words.append(peer_change)
        return True, ", ".join(words)

    def _prebind(self, specs: list[ListenerSpec], freed: set[Endpoint]) -> list[socket.socket]:
        """Bind the new TCP addresses now, so an address in use refuses the reload before anything changed."""
        bound = []
        try:
            for spec in specs:
                if spec.transport is not Transport.TCP or spec.listen in LISTENING or spec.listen in freed:
                    continue
                sock = bind_listening_socket(spec.listen, reuse_port=self.ctx.reuse_port,
                                             transparent=_transparent(spec))
                LISTENING.put(sock)
                bound.append(sock)
        except OSError as e:
            for sock in bound:
                LISTENING.discard(sock)
            raise OSError(e.errno, f"listener {spec.name} on {spec.listen}: {e.strerror}") from None
        return bound

    def _apply(self, plan: ListenerPlan, specs: dict[str, ListenerSpec]) -> None:
        old = self.listeners
        for name in plan.stop_first:
            old[name].stop_accepting()
        for _new, old_name in plan.handover:
            acceptor = getattr(old[old_name], "acceptor", None)  # (the plan hands over TCP listeners only)
            sock = acceptor.release() if acceptor is not None else None
            if sock is not None:
                LISTENING.put(sock)
        started: dict[str, Server] = {}
        for name in plan.start:
            try:
                started[name] = self._start(specs[name])
            except OSError as e:  # a UDP port taken meanwhile: the others are served, this one is reported
                log.error("listener %s on %s cannot start: %s", name, specs[name].listen, e)
        for name in plan.retire:
            self._retire(name, old[name])
        self.listeners = {name: old[name] for name in plan.keep} | started
        for address in LISTENING.close_unclaimed():
            log.warning("listening socket on %s left without a listener: closed", address)

    def _update_peers(self, new: GateConfig) -> str:
        mesh = self.ctx.mesh
        if mesh is None or new.mesh is None:
            return ""
        from gate.mesh.dialer import Mesh
        from gate.mesh.trust import Trust

        if not isinstance(mesh, Mesh):
            return ""
        added, removed, rekeyed = mesh.update_peers(Trust(new.mesh, new.peers))
        return f"peers +{len(added)} -{len(removed)} ~{len(rekeyed)}"

    def _swap_access_log(self, old: GateConfig, new: GateConfig) -> None:
        if new.log.access == old.log.access:
            return
        previous, self.ctx.access_log = self.ctx.access_log, AccessLog(new.log.access)
        previous.close()


def _capture_changed(old: GateConfig, new: GateConfig) -> bool:
    """The rules differ: the capture section, a captured listener's port, the mark, or routes compiled into
    the rules (kernel bypass, UDP fast path) changed."""
    from gate.capture import capture_of

    return capture_of(old) != capture_of(new)


_current: Gateway | None = None


def current() -> Gateway | None:
    """The gate running in this process (None before it starts and once it stops)."""
    return _current


def reload() -> tuple[bool, str]:
    """Reload this process's gate from its config file: what SIGHUP and the admin API's POST /reload do."""
    gateway = _current
    if gateway is None:
        return False, "no gate is running in this process"
    return gateway.reload()


async def admin_reload() -> str:
    """The admin API's POST /reload (gate.admin.set_reload): one gate reloads here and says what changed,
    or raises ConfigError when the new config is refused (the running one stays). A worker asks its
    supervisor instead, which checks the file once and reloads every worker, as on SIGHUP."""
    gateway = _current
    if gateway is not None and gateway.config.workers > 1:
        os.kill(os.getppid(), signal.SIGHUP)
        return "reload signalled to the supervisor: it checks the file once and reloads every worker (see its log)"
    ok, message = reload()
    if not ok:
        raise ConfigError([message])
    return message


@dataclass
class Lifecycle:
    """How this process was started, for what outlives one config: the file to re-read, the capture
    rules to replace, the handoff path to serve and the gate to take over from, the service manager."""

    source: str | None = None
    captured: Captured | None = None  # the capture rules this process applied (None in a forked worker)
    handoff: str | None = None
    predecessor: socket.socket | None = None  # the old gate's connection, answered once we run
    notifier: Notifier | None = None


def supervisor_reload(life: Lifecycle, config: GateConfig) -> GateConfig | None:
    """With ``workers: N``, SIGHUP in the supervisor: validate the file, replace the capture rules (the
    supervisor owns them), and return the new config (for workers it forks later) or None if refused.

    The workers are then signalled, not re-executed: each reloads in place and keeps its open flows and
    its listening sockets, which a new process could only get by fork or handoff."""
    notifier = life.notifier or Notifier("")
    notifier.reloading()
    try:
        if life.source is None:
            raise ConfigError(["this gate was started without a config file to re-read"])
        from gate.preflight import preflight

        new = load_config(life.source)
        problems = preflight(new) + restart_needed(config, new)
        if problems:
            raise ConfigError(problems)
        if life.captured is not None and _capture_changed(config, new):
            life.captured.replace(new)
    except ConfigError as e:
        for problem in e.problems:
            log.error("%s: %s", life.source, problem)
        log.error("reload refused, the running config stays")
        notifier.ready("reload refused")
        return None
    except OSError as e:
        log.error("reload refused, the running config stays: %s", e)
        notifier.ready("reload refused")
        return None
    notifier.ready("reloaded")
    return new
