"""The gateway process: builds listeners from the config, runs until SIGTERM/SIGINT, drains, exits.

SIGHUP reloads the config without dropping flows (gate.reload); SIGUSR1 re-opens the access log file
(what logrotate needs); neither ever stops the gate. With ``workers: N > 1`` a supervisor forks N
workers, each an independent event loop with its own SO_REUSEPORT listening sockets (Python runs one
core per loop); the supervisor forwards signals, restarts a worker that dies, and exits when all have
drained (on SIGHUP it validates the config and replaces the capture rules it owns, then signals the
workers, which reload in place). A worker whose supervisor dies (even by kill -9) is sent SIGTERM by
the kernel (PR_SET_PDEATHSIG), so no worker serves on unsupervised.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import time
from collections.abc import Iterable

import uvloop

from gate.accept import bind_listening_socket
from gate.accesslog import AccessLog
from gate.capture import Captured, applied
from gate.config import GateConfig
from gate.context import Context
from gate.errors import ConfigError
from gate.mesh.dialer import Mesh
from gate.mesh.h2_streams import Serve
from gate.mesh.inbound import Inbound
from gate.mesh.trust import Trust
from gate.reload import Gateway, Lifecycle
from gate.router import Router
from splice import PIPE_POOL

__all__ = ["run", "serve"]

log = logging.getLogger("ugate")
RESTART_DELAY = 1.0  # seconds before a crashed worker is replaced, so a crash loop cannot spin
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REOPEN_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)  # reload, re-open the log (logrotate): never fatal
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent thread ends


async def serve(config: GateConfig, stop: asyncio.Event, access_log: AccessLog, *, reuse_port: bool = False,
                life: Lifecycle | None = None) -> None:
    """Run the listeners until ``stop`` is set, then stop accepting and drain within ``timeouts.drain``."""
    mesh = Mesh(Trust(config.mesh, config.peers), config.mark) if config.mesh is not None else None
    webrtc = None
    if mesh is not None and any("webrtc" in peer.transports for peer in config.peers):
        # Loaded only here: aiortc (and PyAV under it) adds ~45 MB and 0.2 s to every process that imports it
        from gate.mesh.webrtc.dialer import WebrtcMesh
        from gate.mesh.webrtc.seal import Sealer

        assert config.mesh is not None  # (a mesh exists only with its section)
        webrtc = mesh.alternative = WebrtcMesh(
            mesh.trust.identity.id, config.peers, mesh.exchange, stun=config.mesh.stun,
            sealer=Sealer.load(mesh.trust.identity.key_file) if any(p.via_gate for p in config.peers) else None,
            ids={peer.name: mesh.trust.policy.id_of(peer) for peer in config.peers})
    ctx = Context(router=Router(config.routes), access_log=access_log, reuse_port=reuse_port, mark=config.mark,
                  own=frozenset(spec.listen for spec in config.listeners), mesh=mesh, config=config)
    gateway = Gateway(config, ctx, life)
    if any(spec.kind == "admin" for spec in config.listeners):
        from gate.admin import set_reload
        from gate.reload import admin_reload

        set_reload(admin_reload)  # POST /reload
    reverse: list[Inbound] = []  # flows arriving over our reverse tunnels (we are behind NAT)
    wireguard = None
    if mesh is not None and config.wireguard is not None:
        from gate.wireguard.service import WireguardService  # (aioice: loaded only where used)

        wireguard = WireguardService(config.wireguard, mesh.trust.identity.id, mesh, config.peers, access_log)
        wireguard.serve_signalling()  # before any tunnel exists: they all answer its exchanges
    if mesh is not None:
        def serve_for(peer: str) -> Serve:
            reverse.append(Inbound(peer, ctx, config.timeouts.connect, config.timeouts.idle))
            return reverse[-1].serve

        mesh.start_reverse(serve_for)
    try:
        if wireguard is not None:
            await wireguard.start()
        gateway.start()
        gateway.begin(stop)
        # Everything allocated so far lives as long as the process: keep the collector off it.
        gc.freeze()
        log.info("ugate ready: %d listeners, %d routes (pid %d)", len(gateway.listeners), len(config.routes),
                 os.getpid())
        gateway.ready(f"{len(gateway.listeners)} listeners, {len(config.routes)} routes")
        await stop.wait()
        config = gateway.config  # the last one reloaded
        log.info("stopping: no new flows; draining open ones for up to %gs", config.timeouts.drain)
    finally:
        gateway.stop_accepting()
        await gateway.drain(config.timeouts.drain)
        await asyncio.gather(*(inbound.drain(config.timeouts.drain) for inbound in reverse))
        if wireguard is not None:
            await wireguard.aclose()
        if webrtc is not None:
            await webrtc.aclose()
        if mesh is not None:
            mesh.close()
        if ctx.sniff_outcomes:
            outcomes = " ".join(f"{k}={v}" for k, v in sorted(ctx.sniff_outcomes.items()))
            log.info("sniff outcomes: %s", outcomes)
        ctx.access_log.close()
        PIPE_POOL.clear()


async def _main(config: GateConfig, reuse_port: bool, life: Lifecycle) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (reload) and SIGUSR1 (re-open the log) are the gateway's, from when its listeners run
    await serve(config, stop, AccessLog(config.log.access), reuse_port=reuse_port, life=life)


def _ignore(_signum: int, _frame: object) -> None:
    """Until the event loop takes over: SIGHUP/SIGUSR1 must not kill (their default), and a handler,
    unlike SIG_IGN, is not inherited by the programs we run (nft, iptables helpers)."""


def _run_loop(config: GateConfig, reuse_port: bool, life: Lifecycle) -> int:
    try:
        uvloop.run(_main(config, reuse_port, life))
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    finally:
        # The closed loop put the default actions back; the capture rules are yet to be cleared.
        for sig in REOPEN_SIGNALS:
            signal.signal(sig, _ignore)
    return 0


def _die_with(parent: int) -> bool:
    """Ask the kernel for SIGTERM when ``parent`` ends; False if it already has (we were re-parented)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    # The supervisor may have died between fork and prctl: then no signal will ever come.
    return os.getppid() == parent


def _fork_worker(config: GateConfig, inherited: Iterable[int], source: str | None) -> int:
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            for sig in REOPEN_SIGNALS:
                signal.signal(sig, _ignore)
            for fd in inherited:  # the supervisor's alone (the socket owning the capture table)
                os.close(fd)
            os.environ.pop("NOTIFY_SOCKET", None)  # the supervisor alone speaks to the service manager
            if _die_with(supervisor):
                code = _run_loop(config, reuse_port=True, life=Lifecycle(source=source))
        finally:
            os._exit(code)
    return pid


def _supervise(config: GateConfig, inherited: Iterable[int] = (), life: Lifecycle | None = None) -> int:
    """Fork the workers, forward signals to them, replace any that die, exit when all have ended.

    SIGTERM/SIGINT stop the workers (and the supervisor once they have); SIGUSR1 only passes on; SIGHUP
    passes on once the supervisor accepted the new config (gate.reload.supervisor_reload).
    ``inherited`` are descriptors a worker closes after the fork.
    """
    from gate.handoff import LISTENING

    life = life or Lifecycle()
    for spec in config.listeners:  # fail here, once and clearly, if a port cannot be bound
        if spec.listen.port == 0:  # an admin unix socket: each worker puts its own in place
            continue
        if spec.listen in LISTENING:
            continue  # inherited (socket activation): the workers share it
        try:
            bind_listening_socket(spec.listen, reuse_port=True).close()
        except OSError as e:
            log.error("cannot start: listener %s on %s: %s", spec.name, spec.listen, e.strerror)
            return 1
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping, config
        if signum in STOP_SIGNALS:
            stopping = True
            if life.notifier is not None:
                life.notifier.stopping()
        if signum == signal.SIGHUP:
            from gate.reload import supervisor_reload

            new = supervisor_reload(life, config)
            if new is None:  # refused: the workers keep the running config, and only re-open the log
                signum = signal.SIGUSR1
            else:
                config = new
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    workers: set[int] = set()
    for sig in (*STOP_SIGNALS, *REOPEN_SIGNALS):
        signal.signal(sig, forward)
    for _ in range(config.workers):
        workers.add(_fork_worker(config, inherited, life.source))
    log.info("supervisor %d: %d workers %s", os.getpid(), len(workers), sorted(workers))
    _supervisor_notify(life)
    failed = False
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        workers.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if not stopping:
            log.error("worker %d ended unexpectedly (exit %d); restarting it", pid, code)
            time.sleep(RESTART_DELAY)
            if not stopping:
                workers.add(_fork_worker(config, inherited, life.source))
        elif code != 0:
            failed = True
    return 1 if failed else 0


def _fds(captured: Captured | None) -> frozenset[int]:
    return captured.fds if captured is not None else frozenset()


def _supervisor_notify(life: Lifecycle) -> None:
    """READY once the workers are forked (their ports were test-bound), and the watchdog from a timer
    signal, since the supervisor sleeps in wait() rather than in an event loop."""
    from gate.sdnotify import watchdog_interval

    notifier = life.notifier
    if notifier is None:
        return
    notifier.ready("supervising workers")
    interval = watchdog_interval()
    if interval is not None:
        signal.signal(signal.SIGALRM, lambda _s, _f: notifier.watchdog())
        signal.setitimer(signal.ITIMER_REAL, interval, interval)


def run(config: GateConfig, source: str | None = None, handoff: str | None = None) -> int:
    """Run the gateway; 0 after a signal-initiated stop, 1 if it could not start, 2 on bad trust material.

    ``source``: the config file SIGHUP re-reads. ``handoff``: the unix socket path where the gate being
    replaced (if any) passes its listening sockets, and where this one passes them on (gate.upgrade)."""
    from gate.handoff import LISTENING, from_systemd
    from gate.preflight import check_ready
    from gate.sdnotify import Notifier
    from gate.upgrade import take_over

    for sig in REOPEN_SIGNALS:  # from the start: a SIGHUP while the rules are applied must not kill
        signal.signal(sig, _ignore)
    try:
        check_ready(config)  # what ``ugate check`` loads too: keys, certificates, TLS contexts
    except ConfigError as e:
        for problem in e.problems:
            log.error("cannot start: %s", problem)
        return 2
    try:
        adopted = from_systemd(LISTENING)
        if adopted:
            log.info("socket activation: %d listening sockets from the service manager", adopted)
        # (a supervisor never serves the handoff path: taking a predecessor's sockets would never release it)
        predecessor = take_over(handoff, LISTENING) if handoff is not None and config.workers == 1 else None
        with applied(config) as captured:
            life = Lifecycle(source=source, captured=captured, notifier=Notifier())
            if config.workers == 1:
                life.handoff, life.predecessor = handoff, predecessor
                try:
                    return _run_loop(config, reuse_port=False, life=life)
                finally:
                    if life.predecessor is not None:  # we failed before taking over: the old gate goes on,
                        life.predecessor.close()  # with the capture rules it relies on
                        if captured is not None:
                            captured.keep = True
            if handoff is not None:
                log.warning("--handoff passes sockets between single-process gates; workers: %d ignores it",
                            config.workers)
            return _supervise(config, _fds(captured), life)
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
