"""Logging for the daemons, one way for both: to stdout, levels journald understands,
and nothing a device sent can forge a line.

stdout carries the log; stderr only the one line an error ends a command with.
Under systemd (``JOURNAL_STREAM`` set), each line starts with its syslog level as
``<N>`` (sd-daemon(3)), so ``journalctl -p warning`` filters it, and journald adds
the time itself.

Every argument of a log call (``log.info("... %s", value)``) is passed through
:func:`untrusted` by the formatter: control characters (newlines, escape sequences)
are escaped and a long value is cut, so a device id, a topic or an error message
built from a payload cannot start a new line, colour a terminal, or flood the
journal. The message template itself is code, not data: untrusted values go in
arguments, never into an f-string.

With ``log_format = "json"`` each line is one JSON object instead (:class:`JsonFormatter`): for a
log shipper (Loki, Elasticsearch, journald's ``-o cat``) rather than a person; a call names the
device and job it is about with ``extra={"device": ..., "job": ...}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

_SYSLOG = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

#: Longest rendering of one log argument.
MAX_ARG_CHARS = 300


def untrusted(value: object, limit: int = MAX_ARG_CHARS) -> str:
    """``value`` as one printable line of at most about ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and len(text) <= limit:
        return text
    out = text[:limit].encode("unicode_escape").decode("ascii")
    if len(out) > limit:  # escapes lengthen it
        out = out[:limit]
    return out + (f"…(+{len(text) - limit} chars)" if len(text) > limit else "")


class SafeFormatter(logging.Formatter):
    """Formats with every argument made :func:`untrusted` (numbers stay numbers for ``%d``)."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.args, Mapping):
            record.args = {k: _safe(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(_safe(a) for a in record.args)
        return super().format(record)


def _safe(value: object) -> object:
    return value if isinstance(value, (int, float)) else untrusted(value)


class JournaldFormatter(SafeFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_SYSLOG.get(record.levelname, 6)}>{super().format(record)}"


class JsonFormatter(SafeFormatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    ``device`` and ``job`` (from the call's ``extra=``, else the process's own ``device``, else
    null), and ``exception`` when there is one. Under journald the line keeps its ``<N>`` level
    prefix (journald strips it, so the journal's message is the JSON alone)."""

    def __init__(self, journald: bool = False, device: str | None = None) -> None:
        super().__init__()
        self.journald = journald
        self.device = device

    def format(self, record: logging.LogRecord) -> str:
        message = SafeFormatter.format(self, logging.makeLogRecord({**record.__dict__, "exc_info": None,
                                                                     "exc_text": None, "stack_info": None}))
        at = time.gmtime(record.created)
        obj: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", at) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": message,
            "device": _field(getattr(record, "device", None) or self.device),
            "job": _field(getattr(record, "job", None)),
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        line = json.dumps(obj, ensure_ascii=False)
        return f"<{_SYSLOG.get(record.levelname, 6)}>{line}" if self.journald else line


def _field(value: object) -> str | None:
    return None if value is None else untrusted(value)


def setup_logging(level: str, fmt: str = "text", device: str | None = None) -> None:
    """Log to stdout at ``level``: ``fmt`` "text" (journald-friendly lines) or "json" (one object
    per line); ``device`` is the ``device`` field of a board's every JSON line."""
    handler = logging.StreamHandler(sys.stdout)
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    if fmt == "json":
        handler.setFormatter(JsonFormatter(journald, device))
    elif journald:
        handler.setFormatter(JournaldFormatter("%(name)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(SafeFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
