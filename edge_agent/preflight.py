"""Before the agent starts: every file it must read at start can be opened by the user it runs as.

A backbone copied with modes only root can read (``backbone.onnx.data`` came out of older exports
0600, and ``scp -r`` keeps modes), a task file or CA file root made 0600, a folder the agent's user
cannot enter: each is a configuration error (exit 78, systemd does not restart) with one line that
names the file and the fix, instead of a traceback from deep in the loading code.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

from edge_agent.config import EdgeSettings
from schemas.errors import ConfigurationError


def _me() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _blocking_parent(path: Path) -> Path | None:
    """The first folder above ``path`` this process cannot enter, if any."""
    for parent in reversed(path.absolute().parents):
        if parent.is_dir() and not os.access(parent, os.X_OK):
            return parent
    return None


def check_readable(what: str, path: Path, secret: bool = False) -> None:
    """Open ``path`` for reading (a folder: list it); a refusal is a ConfigurationError that says
    how to fix it. A missing file is left to the loader (it has its own message)."""
    me = _me()
    try:
        if path.is_dir():
            os.listdir(path)
        elif path.exists():
            with open(path, "rb"):
                pass
    except PermissionError:
        parent = _blocking_parent(path)
        if parent is not None:
            raise ConfigurationError(f"{what} {path}: user {me} cannot enter the folder {parent}: "
                                     f"chmod o+x {parent} (or chown {me} {parent})") from None
        if path.is_dir():
            fix = f"chmod -R o+rX {path} (or chown -R {me} {path})"
        elif secret:
            fix = f"chown {me} {path} (keep it 0600)"
        else:
            fix = f"chmod o+r {path} (or chown {me} {path})"
        raise ConfigurationError(f"{what} {path} is not readable by user {me}: {fix}") from None
    except OSError as e:
        raise ConfigurationError(f"{what} {path} cannot be opened: {e.strerror or e}") from None


def _backbone_files(directory: Path) -> Iterator[Path]:
    yield directory
    if directory.is_dir() and os.access(directory, os.R_OK | os.X_OK):
        yield from sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def preflight(settings: EdgeSettings) -> None:
    """Every file the agent opens at start, opened once as the agent's user."""
    for path in _backbone_files(Path(settings.backbone_dir).expanduser()):
        check_readable("backbone", path)
    check_readable("task file", Path(settings.task_file))
    if settings.holdout_file is not None:
        check_readable("holdout file", Path(settings.holdout_file))
    if settings.broker_ca_file:
        check_readable("CA file (broker_ca_file)", Path(settings.broker_ca_file))
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if settings.password_file is not None and not (cred_dir and (Path(cred_dir) / "broker-password").is_file()):
        check_readable("password file", Path(settings.password_file), secret=True)
    state = Path(settings.state_dir)
    if state.exists():
        check_readable("state folder", state)
        if not os.access(state, os.W_OK | os.X_OK):
            raise ConfigurationError(f"state folder {state} is not writable by user {_me()}: "
                                     f"chown -R {_me()} {state}")
        for name in ("secret.json", "state.db"):
            check_readable("state file", state / name, secret=True)
