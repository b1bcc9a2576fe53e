"""mosquitto and redis-server as child processes, configured from ``broker_config/``.

Used by ``sidetune demo`` and by the test fixtures, so both run the broker
exactly as shipped (ACLs, limits, persistence). The mosquitto configuration is
rendered here for them and for `sidetune broker init` alike (:func:`mosquitto_fragment`,
:func:`mosquitto_standalone`), from the same template files:

* ``mosquitto-process.conf`` -- user, pid file, persistence location, log file: what
  Debian's stock ``/etc/mosquitto/mosquitto.conf`` already sets;
* ``sidetune.conf`` -- everything else (auth, ACL, limits), then the listeners
  ``listener-tls.conf`` and ``listener-plain.conf`` (loopback only).
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from schemas.errors import SidetuneError

SERVER_USER = "sidetune-server"
#: The server's MQTT client ids are ``sidetune-server-<worker_id>``: no device id may start so
#: (on the TLS listener a board's client id is its device id).
SERVER_CLIENT_ID_PREFIX = "sidetune-server"


def broker_config_dir() -> Path:
    """The template folder: ``$SIDETUNE_BROKER_CONFIG``, else ``broker_config/`` of the source tree
    (an editable install), else the one next to the virtualenv (deploy/install-server.sh copies it
    to /opt/sidetune/broker_config, beside /opt/sidetune/.venv)."""
    env = os.environ.get("SIDETUNE_BROKER_CONFIG")
    if env:
        return Path(env)
    source = Path(__file__).resolve().parent.parent / "broker_config"
    beside_venv = Path(sys.prefix).parent / "broker_config"
    return source if source.is_dir() or not beside_venv.is_dir() else beside_venv


BROKER_CONFIG = broker_config_dir()


class ServiceError(SidetuneError):
    """A child service could not be found or started."""


def find_binary(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if not path:
        raise ServiceError(f"{name} not found: install it with `apt-get install {package}`")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(ServiceError):
    """The child could not bind its port: another process took it between ``free_port`` and the bind."""


def _tail(*logs: Path) -> str:
    return "".join(p.read_text(errors="replace")[-2000:] for p in logs if p.exists())


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, logs: Sequence[Path], what: str,
                   timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(*logs)
            error = PortTaken if "already in use" in tail else ServiceError
            raise error(f"{what} exited with code {proc.returncode} at start:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
            time.sleep(0.1)  # a late config error (another listener) ends it just after the bind
            if proc.poll() is None:
                return
            continue
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise ServiceError(f"{what} did not listen on port {port} within {timeout:.0f} s:\n{_tail(*logs)}")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_groups(procs: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM every child's process group (started with ``start_new_session=True``), then SIGKILL
    the groups of those still running after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def render(template: Path | str, values: dict[str, str]) -> str:
    """A template of ``broker_config/`` (a path, or a file name there) with every ``{{NAME}}`` filled in."""
    template = Path(template) if isinstance(template, Path) else broker_config_dir() / template
    try:
        text = template.read_text()
    except OSError as e:
        raise ServiceError(f"cannot read the template {template}: {e.strerror or e} "
                           "(set SIDETUNE_BROKER_CONFIG to the source's broker_config/ folder)") from None
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    if "{{" in text:
        raise ServiceError(f"{template.name}: unfilled placeholder near {text[text.index('{{'):][:40]!r}")
    return text


_S = TypeVar("_S", bound="_ChildService")


class _ChildService:
    """A server run as a child process; stop and restart keep its port and state."""

    proc: subprocess.Popen[bytes] | None

    state_dir: Path
    port: int
    _port_fields: tuple[str, ...] = ("port",)  # the ports start() may choose (0: choose one)

    def __post_init__(self) -> None:
        # absolute: redis-server changes into its --dir before it opens a relative --logfile
        self.state_dir = Path(self.state_dir).resolve()

    def start(self: _S) -> _S:
        """Start on ``port``; ports chosen here (0) that another process takes first are chosen again."""
        chosen = [f for f in self._port_fields if not getattr(self, f)]
        for attempt in range(3):
            try:
                self._start()
                return self
            except PortTaken:
                if not chosen or attempt == 2:
                    raise
                for f in chosen:
                    setattr(self, f, 0)
                self.proc = None
        raise AssertionError("unreachable")

    def _start(self) -> None:
        raise NotImplementedError

    def _spawn(self, args: list[str], log: Path, what: str) -> None:
        """Run the child, its stdout and stderr in ``<log>.out`` beside its log (a config error is
        only there), and wait until it listens on ``port``."""
        out = log.with_suffix(".out")
        with out.open("ab") as f:
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
        _wait_for_port(self.proc, self.port, [log, out], what)

    def stop(self) -> None:
        _stop(self.proc)

    def restart(self) -> None:
        """Stop and start on the same port and state (mosquitto's retained messages and
        Redis's append-only file persist)."""
        self.stop()
        self.start()


def mosquitto_fragment(values: dict[str, str], *, tls: bool = True, plain: bool = True) -> str:
    """sidetune.conf and the listeners: the conf.d fragment (it loads under Debian's stock
    mosquitto.conf, which sets user, pid file, persistence and log file itself).

    ``values``: PASSWORD_FILE, ACL_FILE; with ``tls`` TLS_PORT, BIND, CA_FILE, CERT_FILE,
    KEY_FILE; with ``plain`` PLAIN_PORT (a listener on 127.0.0.1 only)."""
    if not (tls or plain):
        raise ServiceError("a broker needs a listener: TLS, plaintext on loopback, or both")
    parts = [render("sidetune.conf", values)]
    if tls:
        parts.append(render("listener-tls.conf", values))
    if plain:
        parts.append(render("listener-plain.conf", values))
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def mosquitto_standalone(values: dict[str, str], *, tls: bool = True, plain: bool = True) -> str:
    """mosquitto-process.conf (USER, STATE_DIR) followed by the fragment: a broker of its own."""
    return render("mosquitto-process.conf", values).rstrip("\n") + "\n\n" + mosquitto_fragment(
        values, tls=tls, plain=plain)


def redis_settings() -> list[tuple[str, str]]:
    """The (directive, value) lines of broker_config/redis.conf."""
    out = []
    for line in render("redis.conf", {}).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value.strip()))
    return out


def new_password() -> str:
    """A generated password (URL-safe, 32 characters, never starting with '-')."""
    while True:
        pw = secrets.token_urlsafe(24)
        if pw[0].isalnum():
            return pw


def new_share_group() -> str:
    """A secret name for the server's shared subscription (``$share/<name>/...``).

    mosquitto 2.0.11 lets any account subscribe to any ``$share/...`` filter (its ACL file
    checks no subscription), and a member of the server's group takes its round-robin share
    of every device's uplinks; a group name a device cannot guess keeps it out."""
    return "w-" + secrets.token_hex(16)


def set_passwords(passwd: Path, accounts: dict[str, str]) -> None:
    """Add or replace accounts in a mosquitto password file (``mosquitto_passwd -b``); its mode
    and owner are kept (a new file is 0600)."""
    if not passwd.exists():
        passwd.touch(mode=0o600)
    tool = find_binary("mosquitto_passwd", "mosquitto")
    for user, password in accounts.items():
        proc = subprocess.run([tool, "-b", str(passwd), user, password], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServiceError(f"mosquitto_passwd could not set {user!r} in {passwd}: "
                               f"{(proc.stderr or proc.stdout).strip()}")


@dataclass
class Mosquitto(_ChildService):
    """A mosquitto child process with per-account passwords from ``accounts``: a plaintext
    listener on 127.0.0.1:``port`` and, with ``tls``, a TLS one on 127.0.0.1:``tls_port``
    (a short-lived CA of its own, made by sidetune.certs like a broker's)."""

    state_dir: Path
    accounts: dict[str, str]
    port: int = 0
    tls: bool = False
    tls_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _port_fields = ("port", "tls_port")

    @property
    def log(self) -> Path:
        return self.state_dir / "mosquitto.log"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "tls" / "ca.crt"

    def write_config(self) -> Path:
        from sidetune.certs import make_ca, make_server_cert

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        passwd = self.state_dir / "passwd"
        passwd.unlink(missing_ok=True)
        set_passwords(passwd, self.accounts)
        tls_dir = self.state_dir / "tls"
        if self.tls:
            while not self.tls_port or self.tls_port == self.port:
                self.tls_port = free_port()
            if not (tls_dir / "server.crt").exists():
                make_ca(tls_dir, name="sidetune test CA", days=30)
                make_server_cert(tls_dir, [], days=30)
        conf = mosquitto_standalone({
            "USER": getpass.getuser(), "STATE_DIR": str(self.state_dir), "PASSWORD_FILE": str(passwd),
            "ACL_FILE": str(broker_config_dir() / "acl"), "PLAIN_PORT": str(self.port), "BIND": "127.0.0.1",
            "TLS_PORT": str(self.tls_port), "CA_FILE": str(tls_dir / "ca.crt"),
            "CERT_FILE": str(tls_dir / "server.crt"), "KEY_FILE": str(tls_dir / "server.key"),
        }, tls=self.tls)
        path = self.state_dir / "mosquitto.conf"
        path.write_text(conf)
        return path

    def _start(self) -> None:
        conf = self.write_config() if self.proc is None else self.state_dir / "mosquitto.conf"
        self._spawn([find_binary("mosquitto", "mosquitto"), "-c", str(conf)], self.log, "mosquitto")


@dataclass
class RedisServer(_ChildService):
    """redis-server with broker_config/redis.conf and a password (``requirepass``; generated
    unless given); ``url`` carries it."""

    state_dir: Path
    port: int = 0
    password: str = field(default_factory=new_password, repr=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.state_dir / "redis.log"

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [find_binary("redis-server", "redis-server")]
        for key, value in redis_settings():
            args += [f"--{key}", value.strip('"')]
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.state_dir),
                 "--logfile", str(self.log), "--daemonize", "no", "--protected-mode", "yes",
                 "--requirepass", self.password]
        self._spawn(args, self.log, "redis-server")
        self._wait_until_loaded()

    def _wait_until_loaded(self, timeout: float = 120.0) -> None:
        """Redis accepts connections while it loads its append-only file and answers every
        command with -LOADING until done (seconds, for a large file): wait for a PONG."""
        assert self.proc is not None
        pw = self.password.encode()
        request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(pw), pw)
        deadline = time.monotonic() + timeout
        reply = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"redis-server exited with code {self.proc.returncode} while loading its data")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(request)
                    reply = b""
                    while reply.count(b"\r\n") < 2:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        reply += chunk
            except OSError:
                reply = b""
            if reply.endswith(b"+PONG\r\n"):
                return
            time.sleep(0.05)
        raise ServiceError(f"redis-server on port {self.port} still not ready after {timeout:.0f} s: {reply[:200]!r}")
