"""One exception family and one exit-code table for the whole product.

Everything sidetune raises on purpose derives from :class:`SidetuneError`;
each class carries the exit code the ``sidetune`` command ends with, so every
subcommand (and systemd, through ``RestartPreventExitStatus=78``) reads the
same table:

====  ==================  ====================================================
code  class               meaning
====  ==================  ====================================================
0                         success
1     SidetuneError       the work failed (a job failed, a target was missed)
2     UsageError          bad usage or bad input (a wrong flag, a missing file)
69    UnavailableError    a service is unavailable (broker or Redis unreachable
                          at start); systemd restarts, it may come back
78    ConfigurationError  configuration error: a config that does not validate,
                          a missing backbone, a bad task, certificate or
                          credentials, a missing extra; restarting will not fix
                          it, so systemd stops
130                       interrupted (Ctrl-C)
====  ==================  ====================================================

Bad bytes from the wire are always a :class:`WireError` (a ``ValueError``), so
a transport loop needs exactly one ``except`` to stay alive.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 69
    CONFIG = 78
    INTERRUPTED = 130


class SidetuneError(Exception):
    """Root of every error sidetune raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILED


class UsageError(SidetuneError):
    """Bad command-line usage or bad input named on the command line."""

    exit_code = ExitCode.USAGE


class ConfigurationError(SidetuneError):
    """A configuration that cannot work: restarting the process will not fix it."""

    exit_code = ExitCode.CONFIG


class UnavailableError(SidetuneError):
    """A service the command needs is not reachable now (it may be later)."""

    exit_code = ExitCode.UNAVAILABLE


class MissingExtra(ConfigurationError):
    """A command needs an optional part of the package that is not installed."""

    def __init__(self, what: str, extra: str, module: str) -> None:
        super().__init__(f"{what} needs the '{extra}' extra ({module} is not installed): "
                         f"pip install 'sidetune[{extra}]'")


class WireError(SidetuneError, ValueError):
    """A payload or topic that does not satisfy the wire contract.

    ``code`` is a short machine-readable reason (it travels in rejections);
    the message says, for a person, what is wrong.
    """

    def __init__(self, message: str, code: str = "invalid", msg_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        #: The rejected message's id, when it could be read (rejections name it).
        self.msg_id = msg_id


class SpecMismatch(SidetuneError):
    """Weights or activations built for another spec or backbone."""
