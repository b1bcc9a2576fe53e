"""The dashboard's HTTP server: one page, three JSON endpoints, one event stream. Read-only.

Routes (every one behind the bearer token when the dashboard has one):

* ``GET /`` -- the page: ``static/index.html`` with ``app.css`` and ``app.js`` inlined, so the
  browser makes no other request for it (and a token given once as ``/?token=T`` is enough: the
  page keeps it in ``sessionStorage`` and sends it as ``Authorization: Bearer`` from then on);
* ``GET /api/fleet`` -- ``side_server.fleet.fleet_snapshot`` (what ``sidetune fleet --json`` prints);
* ``GET /api/devices/<device>`` -- ``device_detail``; ``GET /api/jobs/<device>/<job>`` -- ``job_detail``;
* ``GET /api/events`` -- server-sent events: an ``event: fleet`` with the snapshot whenever it
  changes (checked every ``interval`` seconds), a comment every 15 s to keep proxies from closing it;
* ``GET /healthz`` -- 200 ``{"ok": true}`` when Redis answers, 503 with the reason otherwise.

Redis is only read, and only through ``side_server.fleet`` (its snapshot functions are the
data contract). A Redis that stops answering makes the API answer 503 with the
reason and the page show it; the page recovers by itself when Redis returns.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("sidetune.dashboard")

KEEPALIVE_SECONDS = 15.0


class FleetUnavailable(Exception):
    """Redis could not be read; the message says why (shown on the page)."""


@dataclass
class FleetSource:
    """The three read functions of the contract, bound to one Redis client."""

    snapshot: Callable[[], dict[str, Any]]
    device: Callable[[str], dict[str, Any] | None]
    job: Callable[[str, str], dict[str, Any] | None]
    ping: Callable[[], object]


def redis_source(r: Any) -> FleetSource:
    """A :class:`FleetSource` reading ``r`` (a ``redis.Redis``) through ``side_server.fleet``;
    Redis errors become :class:`FleetUnavailable`."""
    import redis

    from side_server import fleet

    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any) -> Any:
            try:
                return fn(r, *a)
            except redis.RedisError as e:
                raise FleetUnavailable(f"redis: {e}") from None
        return call

    return FleetSource(snapshot=guarded(fleet.fleet_snapshot), device=guarded(fleet.device_detail),
                       job=guarded(fleet.job_detail), ping=guarded(lambda rr: rr.ping()))


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the dashboard on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def page() -> bytes:
    """index.html with app.css and app.js inlined (package data of sidetune.dashboard)."""
    static = resources.files("sidetune.dashboard") / "static"
    html = (static / "index.html").read_text(encoding="utf-8")
    css = (static / "app.css").read_text(encoding="utf-8")
    js = (static / "app.js").read_text(encoding="utf-8")
    return html.replace("/*APP_CSS*/", css).replace("/*APP_JS*/", js).encode()


class _Changes:
    """One poller for every event-stream client: reads the snapshot every ``interval`` seconds
    while at least one client listens, and wakes them when it changed."""

    def __init__(self, source: FleetSource, interval: float) -> None:
        self.source, self.interval = source, interval
        self.cond = threading.Condition()
        self.version = 0
        self.body = b""
        self.listeners = 0
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[bytes, bytes]:
        """(what identifies the state, the event's body)."""
        try:
            snap = self.source.snapshot()
        except FleetUnavailable as e:
            body = json.dumps({"error": str(e)}).encode()
            return body, body
        except Exception as e:  # a bug in reading must not kill the stream; the page shows it
            log.exception("reading the fleet failed")
            body = json.dumps({"error": f"reading the fleet failed: {e}"}).encode()
            return body, body
        same = {k: v for k, v in snap.items() if k != "generated_at"}  # it changes on every read
        return json.dumps(same, sort_keys=True).encode(), json.dumps(snap).encode()

    def _run(self) -> None:
        last = b""
        while not self.stopping.is_set():
            with self.cond:
                while self.listeners == 0 and not self.stopping.is_set():
                    self.cond.wait()
            if self.stopping.is_set():
                return
            state, body = self._read()
            with self.cond:
                if state != last:
                    last = state
                    self.body = body
                    self.version += 1
                    self.cond.notify_all()
            self.stopping.wait(self.interval)

    def subscribe(self) -> None:
        with self.cond:
            self.listeners += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dashboard-poller", daemon=True)
                self._thread.start()
            self.cond.notify_all()

    def unsubscribe(self) -> None:
        with self.cond:
            self.listeners -= 1

    def wait_newer(self, seen: int, timeout: float) -> tuple[int, bytes]:
        with self.cond:
            self.cond.wait_for(lambda: self.version > seen or self.stopping.is_set(), timeout)
            return self.version, self.body

    def stop(self) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()


@dataclass
class Dashboard:
    """The server: ``start()`` binds and serves in a thread, ``stop()`` ends every stream."""

    source: FleetSource
    host: str = "127.0.0.1"
    port: int = 8470
    token: str | None = None
    interval: float = 1.0
    httpd: ThreadingHTTPServer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.changes = _Changes(self.source, self.interval)
        self._page = page()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self.httpd is not None
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.httpd.server_address[1]}/"

    def start(self) -> Dashboard:
        handler = type("Handler", (_Handler,), {"dashboard": self})
        server_class = type("Server", (ThreadingHTTPServer,), {"daemon_threads": True,
                                                               "address_family": _family(self.host)})
        self.httpd = server_class((self.host, self.port), handler)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.changes.stop()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def authorized(self, header: str | None, query_token: str | None) -> bool:
        if self.token is None:
            return True
        given = ""
        if header and header.startswith("Bearer "):
            given = header[len("Bearer "):].strip()
        elif query_token is not None:
            given = query_token
        return hmac.compare_digest(given.encode(), self.token.encode())


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    server_version = "sidetune-dashboard"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ replies

    def _send(self, status: int, body: bytes, ctype: str = "application/json", extra: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: object) -> None:
        self._send(status, json.dumps(value).encode())

    # ------------------------------------------------------------------ routes

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        is_page = url.path in ("/", "/index.html")
        token = query.get("token", [None])[0] if is_page else None
        if not self.dashboard.authorized(self.headers.get("Authorization"), token):
            self._json(HTTPStatus.UNAUTHORIZED, {"error": "a bearer token is required: open /?token=TOKEN once, "
                                                          "or send 'Authorization: Bearer TOKEN'"})
            return
        parts = [unquote(p) for p in url.path.strip("/").split("/")] if url.path != "/" else []
        src = self.dashboard.source
        try:
            if is_page:
                self._send(HTTPStatus.OK, self.dashboard._page, "text/html; charset=utf-8",
                           {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                                       "style-src 'unsafe-inline'; connect-src 'self'; img-src data:"})
            elif parts == ["healthz"]:
                src.ping()
                self._json(HTTPStatus.OK, {"ok": True})
            elif parts == ["api", "fleet"]:
                self._json(HTTPStatus.OK, src.snapshot())
            elif len(parts) == 3 and parts[:2] == ["api", "devices"]:
                self._found(src.device(parts[2]), f"no device {parts[2]!r}")
            elif len(parts) == 4 and parts[:2] == ["api", "jobs"]:
                self._found(src.job(parts[2], parts[3]), f"no job {parts[3]!r} of device {parts[2]!r}")
            elif parts == ["api", "events"]:
                self._events()
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})
        except FleetUnavailable as e:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _found(self, value: dict[str, Any] | None, missing: str) -> None:
        if value is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": missing})
        else:
            self._json(HTTPStatus.OK, value)

    def _events(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        changes = self.dashboard.changes
        changes.subscribe()
        try:
            self.wfile.write(b"retry: 2000\n\n")
            self.wfile.flush()
            seen = 0
            last_write = time.monotonic()
            while not changes.stopping.is_set():
                version, body = changes.wait_newer(seen, 1.0)
                if version > seen:
                    seen = version
                    self.wfile.write(b"event: fleet\ndata: " + body + b"\n\n")
                    self.wfile.flush()
                    last_write = time.monotonic()
                elif time.monotonic() - last_write > KEEPALIVE_SECONDS:
                    self.wfile.write(b": keepalive\n\n")
                    self.wfile.flush()
                    last_write = time.monotonic()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            changes.unsubscribe()
