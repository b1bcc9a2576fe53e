"""sd_notify without libsystemd, and an honest watchdog for the Type=notify units.

The watchdog is petted only where work moves on. The board's agent pets it from
its main loop and from every batch of every long phase (forward passes, uploads,
evaluation, inbox ingestion): a hung phase stops the pets and systemd restarts
the agent, a slow board does not (a backbone batch takes seconds at Pi speed).
A server worker pets it while its threads are alive and its ingest loop turns.
"""

from __future__ import annotations

import os
import socket
import time


def notify(state: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_seconds() -> float | None:
    """``WatchdogSec`` of the unit (systemd's ``WATCHDOG_USEC``), when it applies to this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return int(usec) / 1e6 if int(usec) > 0 else None
    except ValueError:
        return None


class Watchdog:
    """``pet()`` is cheap: it sends ``WATCHDOG=1`` at most every ``interval`` seconds
    (a quarter of ``WatchdogSec``, at most 5 s), so a phase may call it per batch."""

    def __init__(self, interval: float | None = None) -> None:
        timeout = watchdog_seconds()
        self.interval = interval if interval is not None else min(5.0, timeout / 4) if timeout else 5.0
        self._last = float("-inf")

    def pet(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            notify("WATCHDOG=1")
            self._last = now
