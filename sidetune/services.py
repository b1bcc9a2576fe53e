"""mosquitto and redis-server as child processes, configured from ``broker_config/``.

Used by ``sidetune demo`` and by the test fixtures, so both run the broker
exactly as shipped (ACLs, limits, persistence).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from schemas.errors import SidetuneError

BROKER_CONFIG = Path(__file__).resolve().parent.parent / "broker_config"
SERVER_USER = "sidetune-server"


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


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServiceError(f"{what} exited with code {proc.returncode} at start:\n{tail}")
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
    raise ServiceError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def render(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    if "{{" in text:
        raise ServiceError(f"{template.name}: unfilled placeholder near {text[text.index('{{'):][:40]!r}")
    return text


class _ChildService:
    """A server run as a child process; stop and restart keep its port and state."""

    proc: subprocess.Popen[bytes] | None

    def start(self) -> _ChildService:
        raise NotImplementedError

    def stop(self) -> None:
        _stop(self.proc)

    def restart(self) -> None:
        """Stop and start on the same port and state (mosquitto's retained messages and
        Redis's append-only file persist)."""
        self.stop()
        self.start()


@dataclass
class Mosquitto(_ChildService):
    """A mosquitto child process with per-account passwords from ``accounts``."""

    state_dir: Path
    accounts: dict[str, str]
    port: int = 0
    tls: bool = False
    tls_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.state_dir / "mosquitto.log"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "tls" / "ca.crt"

    def write_config(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        passwd = self.state_dir / "passwd"
        passwd.write_text("")
        tool = find_binary("mosquitto_passwd", "mosquitto")
        for user, password in self.accounts.items():
            subprocess.run([tool, "-b", str(passwd), user, password], check=True, capture_output=True)
        passwd.chmod(0o600)
        tls_block = ""
        if self.tls:
            while not self.tls_port or self.tls_port == self.port:
                self.tls_port = free_port()
            tls_dir = make_test_ca(self.state_dir / "tls")
            tls_block = render(BROKER_CONFIG / "tls-listener.conf", {
                "TLS_PORT": str(self.tls_port), "BIND": "127.0.0.1", "CA_FILE": str(tls_dir / "ca.crt"),
                "CERT_FILE": str(tls_dir / "server.crt"), "KEY_FILE": str(tls_dir / "server.key"),
            })
        conf = render(BROKER_CONFIG / "mosquitto.conf", {
            "USER": getpass.getuser(), "STATE_DIR": str(self.state_dir), "PASSWORD_FILE": str(passwd),
            "ACL_FILE": str(BROKER_CONFIG / "acl"), "PORT": str(self.port), "BIND": "127.0.0.1",
            "TLS_LISTENER": tls_block,
        })
        path = self.state_dir / "mosquitto.conf"
        path.write_text(conf)
        return path

    def start(self) -> Mosquitto:
        conf = self.write_config() if self.proc is None else self.state_dir / "mosquitto.conf"
        self.proc = subprocess.Popen(
            [find_binary("mosquitto", "mosquitto"), "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.proc, self.port, self.log, "mosquitto")
        return self



@dataclass
class RedisServer(_ChildService):
    state_dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.state_dir / "redis.log"

    def start(self) -> RedisServer:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [find_binary("redis-server", "redis-server")]
        for line in (BROKER_CONFIG / "redis.conf").read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition(" ")
                args += [f"--{key}", value.strip().strip('"')]
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.state_dir),
                 "--logfile", str(self.log), "--daemonize", "no", "--protected-mode", "yes"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.proc, self.port, self.log, "redis-server")
        return self


def make_test_ca(out: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 (tests and the demo only)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "server.crt").exists():
        return out
    openssl = find_binary("openssl", "openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=out)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=sidetune test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (out / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "server.crt")
    for f in out.iterdir():
        f.chmod(0o644)
    return out
