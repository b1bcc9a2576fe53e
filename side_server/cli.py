"""``sidetune server``: run one worker until SIGTERM (systemd) or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

import redis

from schemas.settings import ConfigError, load_settings
from schemas.transport import TransportError
from side_server.config import ServerSettings

EXIT_OK, EXIT_UNAVAILABLE, EXIT_CONFIG = 0, 69, 78


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(ServerSettings, args.config)
    except ConfigError as e:
        print(f"sidetune server: {e}")
        return EXIT_CONFIG
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from side_server.worker import Worker

    worker = Worker(settings)
    try:
        if args.check:
            worker.r.ping()
            worker.transport.start(timeout=10)
            worker.transport.stop()
            print(f"ok: broker {settings.broker_host}:{settings.broker_port} and redis {settings.redis_url} reachable")
            return EXIT_OK
        worker.start()
    except (redis.RedisError, TransportError) as e:
        print(f"sidetune server: service unavailable: {e}")
        return EXIT_UNAVAILABLE
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    logging.getLogger("sidetune.server").info("stopping (signal)")
    worker.stop()
    return EXIT_OK
