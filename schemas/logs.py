"""Logging for the daemons, one way for both: to stdout, levels journald understands.

stdout carries the log; stderr only the one line an error ends a command with.
Under systemd (``JOURNAL_STREAM`` set), each line starts with its syslog level as
``<N>`` (sd-daemon(3)), so ``journalctl -p warning`` filters it, and journald adds
the time itself.
"""

from __future__ import annotations

import logging
import os
import sys

_SYSLOG = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class JournaldFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_SYSLOG.get(record.levelname, 6)}>{super().format(record)}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournaldFormatter("%(name)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
