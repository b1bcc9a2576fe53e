"""``sidetune dashboard``: the fleet in a browser, live, read-only, in a process of its own.

It reads the server's Redis (the ``redis_url`` and password of ``server.toml``) through
``side_server.fleet`` only and serves one self-contained page (``static/``: no CDN, nothing
fetched from the internet). Bound to 127.0.0.1 by default; any other address needs a bearer
token (systemd's credential ``dashboard-token``, else ``--token-file``), or it refuses to start
(exit 78). See README, "The dashboard".
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from schemas.errors import ConfigurationError, ExitCode, UnavailableError

DEFAULT_PORT = 8470

log = logging.getLogger("sidetune.dashboard")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `sidetune dashboard` to the CLI's subparsers."""
    p = sub.add_parser("dashboard", help="the fleet's live web dashboard (read-only, its own process)")
    p.add_argument("--config", required=True, help="the server's TOML (its Redis settings are used)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: any free)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs a token)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="a file holding the bearer token (systemd's credential dashboard-token comes first)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between reads of Redis for live updates")
    p.set_defaults(func=run)


def load_token(path: Path | None) -> str | None:
    """The bearer token: systemd's credential ``dashboard-token``, else ``path``, else None."""
    import os

    from schemas.settings import read_secret

    cred = os.environ.get("CREDENTIALS_DIRECTORY")
    if path is None and not (cred and (Path(cred) / "dashboard-token").is_file()):
        return None
    token = read_secret("dashboard token", "", path, "dashboard-token").strip()
    if len(token) < 16:
        raise ConfigurationError("dashboard token: shorter than 16 characters; make one with "
                                 "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token


def run(args: argparse.Namespace) -> int:
    import redis

    from schemas.logs import setup_logging
    from schemas.settings import load_settings
    from side_server.config import ServerSettings
    from side_server.redis_client import connect
    from sidetune.dashboard.server import Dashboard, FleetUnavailable, is_loopback, redis_source

    if not 0 <= args.port < 65536:
        raise ConfigurationError(f"--port {args.port}: not a TCP port")
    if args.interval <= 0:
        raise ConfigurationError("--interval must be positive")
    token = load_token(args.token_file)
    if token is None and not is_loopback(args.host):
        raise ConfigurationError(f"--host {args.host} is not a loopback address: the dashboard needs a bearer "
                                 "token for it (--token-file FILE, or systemd's credential dashboard-token)")
    settings = load_settings(ServerSettings, args.config)
    setup_logging(settings.log_level, settings.log_format)
    r = connect(settings)
    source = redis_source(r)
    try:
        r.ping()
    except redis.AuthenticationError as e:
        raise ConfigurationError(f"redis refused the password: {e}") from None
    except redis.RedisError as e:
        raise UnavailableError(f"redis unavailable: {e}") from None
    try:
        source.snapshot()
    except FleetUnavailable as e:
        raise UnavailableError(str(e)) from None
    dash = Dashboard(source, host=args.host, port=args.port, token=token, interval=args.interval)
    try:
        dash.start()
    except OSError as e:
        raise UnavailableError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"dashboard on {dash.url}{' (bearer token required)' if token else ''}", flush=True)
    from schemas.systemd import notify

    notify("READY=1")
    done.wait()
    log.info("stopping (signal)")
    dash.stop()
    r.close()
    return ExitCode.OK
