"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram per state change.

``Type=notify`` units learn that the gate is ready (READY=1), reloading (RELOADING=1 with the
MONOTONIC_USEC that ``Type=notify-reload`` requires), stopping (STOPPING=1) and alive (WATCHDOG=1 every
half of ``WatchdogSec``). Outside systemd (no NOTIFY_SOCKET) every call does nothing, so the gate runs the
same under a plain shell, a container runtime or the tests.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier", "message", "watchdog_interval"]


def message(**fields: str | int) -> bytes:
    """``KEY=value`` lines as systemd reads them (newline-separated, no trailing newline needed)."""
    return "\n".join(f"{key}={value}" for key, value in fields.items()).encode()


def _address(path: str) -> str | bytes:
    """NOTIFY_SOCKET is a path, or (leading ``@``) a name in the abstract namespace."""
    return b"\0" + path[1:].encode() if path.startswith("@") else path


def watchdog_interval(env: dict[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or None
    when the watchdog is off or meant for another process (WATCHDOG_PID)."""
    env = dict(os.environ) if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2e6


class Notifier:
    """Sends state changes to the service manager; every method is a no-op without NOTIFY_SOCKET.

    A send that fails is dropped: the manager going away must never stop the gate (systemd does the
    same in sd_notify, which only reports the error).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = os.environ.get("NOTIFY_SOCKET") if path is None else path
        self._sock: socket.socket | None = None
        if self.path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, data: bytes) -> bool:
        if self._sock is None or not self.path:
            return False
        try:
            self._sock.sendto(data, _address(self.path))
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(message(READY=1, MAINPID=os.getpid(), **({"STATUS": status} if status else {})))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets the manager tell this reload from an earlier one (Type=notify-reload)
        return self.send(message(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))

    def stopping(self) -> bool:
        return self.send(message(STOPPING=1))

    def watchdog(self) -> bool:
        return self.send(message(WATCHDOG=1))

    def status(self, text: str) -> bool:
        return self.send(message(STATUS=text))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
