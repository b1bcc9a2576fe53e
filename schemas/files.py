"""Private files, written atomically: the one helper every writer of state uses.

A reader sees the old file or the new one, never half of one (write a temporary
file beside it, fsync, rename). Files that hold texts, token ids, labels,
activations or secrets are created ``0600`` whatever the process umask.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

PRIVATE = 0o600


def atomic_write(path: Path, data: bytes | str, mode: int = PRIVATE) -> None:
    atomic_write_with(path, lambda f: f.write(data.encode() if isinstance(data, str) else data), mode)


def atomic_write_with(path: Path, write: Callable[[IO[bytes]], object], mode: int = PRIVATE) -> None:
    """Call ``write`` on a fresh binary file and move it over ``path`` once it is on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; this is not
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_dir(path: Path) -> Path:
    """A directory only its owner can enter (created if missing, tightened if it exists)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path
