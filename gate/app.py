"""The gateway process: builds listeners from the config, runs until SIGTERM/SIGINT, drains, exits."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from gate.accesslog import AccessLog
from gate.config import GateConfig
from gate.listeners import Context, Listener, make_listener
from gate.router import Router
from splice import PIPE_POOL

__all__ = ["run"]

log = logging.getLogger("ugate")


async def serve(config: GateConfig, stop: asyncio.Event) -> None:
    """Run the listeners until ``stop`` is set, then stop accepting and drain within ``timeouts.drain``."""
    access_log = AccessLog(config.log.access)
    ctx = Context(router=Router(config.routes), access_log=access_log)
    listeners: list[Listener] = []
    try:
        for spec in config.listeners:
            listener = make_listener(spec, ctx)
            listener.start()
            listeners.append(listener)
        log.info("ugate ready: %d listeners, %d routes", len(listeners), len(config.routes))
        await stop.wait()
        log.info("stopping: no new flows; draining open ones for up to %gs", config.timeouts.drain)
    finally:
        for listener in listeners:
            listener.stop_accepting()
        await asyncio.gather(*(listener.drain(config.timeouts.drain) for listener in listeners))
        access_log.close()
        PIPE_POOL.clear()


async def _main(config: GateConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop)


def run(config: GateConfig) -> int:
    """Run the gateway on uvloop; 0 after a signal-initiated stop, 1 if a listener could not start."""
    try:
        uvloop.run(_main(config))
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    return 0
