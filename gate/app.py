"""The gateway process: builds listeners from the config, runs until SIGTERM/SIGINT, drains, exits.

With ``workers: N > 1`` a supervisor forks N workers, each an independent event loop with its own
SO_REUSEPORT listening sockets (Python runs one core per loop); the supervisor forwards signals,
restarts a worker that dies, and exits when all have drained.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time

import uvloop

from gate.accept import bind_listening_socket
from gate.accesslog import AccessLog
from gate.capture import applied
from gate.config import GateConfig
from gate.context import Context
from gate.errors import ConfigError
from gate.listeners import Server, make_listener
from gate.mesh.dialer import Mesh
from gate.mesh.h2_streams import Serve
from gate.mesh.inbound import Inbound
from gate.mesh.trust import Trust
from gate.router import Router
from splice import PIPE_POOL

__all__ = ["run", "serve"]

log = logging.getLogger("ugate")
RESTART_DELAY = 1.0  # seconds before a crashed worker is replaced, so a crash loop cannot spin


async def serve(config: GateConfig, stop: asyncio.Event, *, reuse_port: bool = False) -> None:
    """Run the listeners until ``stop`` is set, then stop accepting and drain within ``timeouts.drain``."""
    access_log = AccessLog(config.log.access)
    mesh = Mesh(Trust(config.mesh, config.peers), config.mark) if config.mesh is not None else None
    ctx = Context(router=Router(config.routes), access_log=access_log, reuse_port=reuse_port, mark=config.mark,
                  own=frozenset(spec.listen for spec in config.listeners), mesh=mesh)
    listeners: list[Server] = []
    reverse: list[Inbound] = []  # flows arriving over our reverse tunnels (we are behind NAT)
    if mesh is not None:
        def serve_for(peer: str) -> Serve:
            reverse.append(Inbound(peer, ctx, config.timeouts.connect, config.timeouts.idle))
            return reverse[-1].serve

        mesh.start_reverse(serve_for)
    try:
        for spec in config.listeners:
            listener = make_listener(spec, ctx)
            listener.start()
            listeners.append(listener)
        # Everything allocated so far lives as long as the process: keep the collector off it.
        gc.freeze()
        log.info("ugate ready: %d listeners, %d routes (pid %d)", len(listeners), len(config.routes), os.getpid())
        await stop.wait()
        log.info("stopping: no new flows; draining open ones for up to %gs", config.timeouts.drain)
    finally:
        for listener in listeners:
            listener.stop_accepting()
        await asyncio.gather(*(listener.drain(config.timeouts.drain) for listener in listeners))
        await asyncio.gather(*(inbound.drain(config.timeouts.drain) for inbound in reverse))
        if mesh is not None:
            mesh.close()
        if ctx.sniff_outcomes:
            outcomes = " ".join(f"{k}={v}" for k, v in sorted(ctx.sniff_outcomes.items()))
            log.info("sniff outcomes: %s", outcomes)
        access_log.close()
        PIPE_POOL.clear()


async def _main(config: GateConfig, reuse_port: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop, reuse_port=reuse_port)


def _run_loop(config: GateConfig, reuse_port: bool) -> int:
    try:
        uvloop.run(_main(config, reuse_port))
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    return 0


def _fork_worker(config: GateConfig) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = _run_loop(config, reuse_port=True)
        finally:
            os._exit(code)
    return pid


def _supervise(config: GateConfig) -> int:
    """Fork the workers, forward SIGTERM/SIGINT to them, replace any that die, exit when all have ended."""
    for spec in config.listeners:  # fail here, once and clearly, if a port cannot be bound
        try:
            bind_listening_socket(spec.listen, reuse_port=True).close()
        except OSError as e:
            log.error("cannot start: listener %s on %s: %s", spec.name, spec.listen, e.strerror)
            return 1
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    workers = {_fork_worker(config) for _ in range(config.workers)}
    log.info("supervisor %d: %d workers %s", os.getpid(), len(workers), sorted(workers))
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
                workers.add(_fork_worker(config))
        elif code != 0:
            failed = True
    return 1 if failed else 0


def run(config: GateConfig) -> int:
    """Run the gateway; 0 after a signal-initiated stop, 1 if it could not start, 2 on bad trust material."""
    from gate.preflight import check_ready

    try:
        check_ready(config)  # what ``ugate check`` loads too: keys, certificates, TLS contexts
    except ConfigError as e:
        for problem in e.problems:
            log.error("cannot start: %s", problem)
        return 2
    try:
        with applied(config):
            if config.workers == 1:
                return _run_loop(config, reuse_port=False)
            return _supervise(config)
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
