"""Whether an agent runs on a state directory, and what it last said about itself.

The running agent holds an exclusive ``flock`` on ``agent.lock`` (the kernel drops
it when the process dies, so a crash leaves no stale claim) and rewrites
``agent.json`` (connected, adapter version, activity) as it goes. ``sidetune edge
status`` and ``train`` read both without touching the agent.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from schemas.errors import ConfigurationError
from schemas.files import atomic_write

LOCK = "agent.lock"
STATE = "agent.json"


class AgentLock:
    """One agent per state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> AgentLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigurationError(f"another agent already runs on {self.path.parent} "
                                     f"(pid {read_state(self.path.parent).get('pid', '?')})") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def agent_running(state_dir: Path) -> bool:
    """True while some process holds the agent lock on ``state_dir``."""
    path = Path(state_dir) / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def write_state(state_dir: Path, **fields: Any) -> None:
    atomic_write(Path(state_dir) / STATE, json.dumps({"pid": os.getpid(), "updated": time.time(), **fields}))


def read_state(state_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(state_dir) / STATE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
