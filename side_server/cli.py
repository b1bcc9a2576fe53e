"""``sidetune server``: run one worker until SIGTERM (systemd) or Ctrl-C.

Under systemd (``Type=notify``) it says READY=1 once connected to the broker and
Redis, and pets the watchdog while :meth:`Worker.health` finds nothing wrong.
Errors are raised (``schemas.errors``): a bad config or refused credentials exit
78, a broker or Redis that cannot be reached at start 69 (systemd retries).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

import redis

from schemas.errors import ConfigurationError, ExitCode, UnavailableError
from schemas.logs import setup_logging
from schemas.settings import load_settings
from schemas.systemd import Watchdog, notify
from side_server.config import ServerSettings

log = logging.getLogger("sidetune.server")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(ServerSettings, args.config)
    setup_logging(settings.log_level, settings.log_format)
    from side_server.worker import Worker

    worker = Worker(settings)
    try:
        if args.check:
            worker.r.ping()
            worker.transport.start(timeout=10)
            worker.transport.stop()
            print(f"ok: broker {settings.broker_host}:{settings.broker_port} and redis reachable")
            return ExitCode.OK
        worker.start()
    except redis.AuthenticationError as e:
        raise ConfigurationError(f"redis refused the password: {e}") from None
    except redis.RedisError as e:
        raise UnavailableError(f"redis unavailable: {e}") from None
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    notify("READY=1")
    watchdog = Watchdog()
    while not done.wait(min(1.0, watchdog.interval)):
        why = worker.health()
        if why is None:
            watchdog.pet()
        else:
            log.error("unhealthy: %s (the watchdog is no longer petted)", why)
    notify("STOPPING=1")
    log.info("stopping (signal)")
    worker.stop()
    return ExitCode.OK

