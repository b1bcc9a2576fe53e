"""A broker folder: what `sidetune broker init` writes and `add-device` / `remove-device` change.

Layout of DIR (every path in the configuration files is absolute)::

    broker.json          init's parameters (host names, ports, bind address, user)
    ca.key  (0600)       the CA that signs the server certificate; never leaves DIR
    ca.crt               the CA certificate every board gets
    server.crt, server.key (0600, or 0640 for the broker user's group)
    passwd  (0600/0640)  mosquitto password file: sidetune-server and one account per board
    acl                  broker_config/acl
    server.password, redis.password (0600)
    server.toml          the side server's configuration using them
    redis.conf  (0600)   broker_config/redis.conf + port, bind 127.0.0.1, requirepass
    mosquitto.conf       standalone broker: `mosquitto -c DIR/mosquitto.conf`
    conf.d/sidetune.conf fragment for Debian's /etc/mosquitto/conf.d/
    state/               the standalone broker's pid file, persistence and log
    devices/ID/          a board's bundle: edge.toml, ca.crt, edge.password (0600)
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from schemas.errors import SidetuneError, UsageError, WireError
from schemas.topics import check_device_id
from sidetune.certs import make_ca, make_server_cert, san_entry
from sidetune.services import (
    SERVER_USER,
    broker_config_dir,
    find_binary,
    mosquitto_fragment,
    mosquitto_standalone,
    new_password,
    render,
    set_passwords,
)

BROKER_JSON = "broker.json"
#: Debian's broker: its conf.d fragment and pid file (stock /etc/mosquitto/mosquitto.conf).
SYSTEM_FRAGMENT = Path("/etc/mosquitto/conf.d/sidetune.conf")
SYSTEM_PID_FILE = Path("/run/mosquitto/mosquitto.pid")
#: Where deploy/install-board.sh puts things on a board (the bundle's edge.toml points here).
BOARD_CA_FILE = "/etc/sidetune/ca.crt"
BOARD_PASSWORD_FILE = "/etc/sidetune/edge.password"
BOARD_STATE_DIR = "/var/lib/sidetune"
BOARD_BACKBONE_DIR = "/opt/sidetune/backbone"
BOARD_TASK_FILE = "/etc/sidetune/task.toml"

#: Files init writes (and --force replaces).
_OWN_FILES = ("broker.json", "ca.key", "ca.crt", "server.crt", "server.key", "passwd", "acl",
              "server.password", "redis.password", "server.toml", "redis.conf", "mosquitto.conf",
              "conf.d/sidetune.conf")


@dataclass
class BrokerParams:
    hostnames: list[str] = field(default_factory=list)
    tls_port: int = 8883
    plain_port: int = 1883  # 0: no plaintext listener
    bind: str = "0.0.0.0"
    user: str = "mosquitto"
    redis_port: int = 6379

    def check(self) -> BrokerParams:
        for name in self.hostnames:
            san_entry(name)
        for what, port, low in (("--tls-port", self.tls_port, 1), ("--plain-port", self.plain_port, 0),
                                ("--redis-port", self.redis_port, 1)):
            if not low <= port <= 65535:
                raise UsageError(f"bad {what} {port}: {low}-65535" + (" (0: none)" if low == 0 else ""))
        if self.plain_port == self.tls_port:
            raise UsageError(f"--tls-port and --plain-port are both {self.tls_port}")
        if not san_entry(self.bind).startswith("IP:"):
            raise UsageError(f"bad --bind {self.bind!r}: an IP address (0.0.0.0: every IPv4 interface)")
        if not self.user or any(c in self.user for c in " \t\n:/"):
            raise UsageError(f"bad --user {self.user!r}")
        return self


# ------------------------------------------------------------------ files


def _mkdirs(path: Path, mode: int = 0o755) -> None:
    """``path`` and its missing parents, each ``mode`` whatever the umask (mosquitto's user must
    traverse them to the files it reads)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        p.chmod(mode)


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` atomically, with ``mode`` from the first byte."""
    _mkdirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def load_params(directory: Path) -> BrokerParams:
    path = directory / BROKER_JSON
    if not path.is_file():
        raise UsageError(f"{directory} is not a broker folder (no {BROKER_JSON}): run `sidetune broker init {directory}`")
    try:
        data = json.loads(path.read_text())
        return BrokerParams(**{k: v for k, v in data.items() if k in BrokerParams.__dataclass_fields__})
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def _broker_user(user: str) -> pwd.struct_passwd | None:
    """The account mosquitto switches to, if files must be given to it (we are root, it is not)."""
    if os.geteuid() != 0 or user == "root":
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def _give_to_broker(directory: Path, params: BrokerParams) -> None:
    """mosquitto 2.0 reads the password file, ACL and key after dropping privileges to its user:
    make them readable by that user's group and its state folder its own."""
    state = directory / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    acct = _broker_user(params.user)
    for name in ("passwd", "server.key"):
        p = directory / name
        if p.exists():
            if acct:
                os.chown(p, 0, acct.pw_gid)
            p.chmod(0o640 if acct else 0o600)
    if acct:
        os.chown(directory / "acl", 0, acct.pw_gid)
        (directory / "acl").chmod(0o640)
        os.chown(state, acct.pw_uid, acct.pw_gid)
        for p in state.iterdir():
            os.chown(p, acct.pw_uid, acct.pw_gid)


def write_configs(directory: Path, params: BrokerParams) -> list[Path]:
    """Render every configuration file of DIR from broker_config/ and ``params``, keeping the
    certificates and passwords already there (init, and `sidetune broker refresh` after an upgrade)."""
    d = directory
    redis_pw = (d / "redis.password").read_text().strip()
    values = {
        "USER": params.user, "STATE_DIR": str(d / "state"), "PASSWORD_FILE": str(d / "passwd"),
        "ACL_FILE": str(d / "acl"), "TLS_PORT": str(params.tls_port), "BIND": params.bind,
        "PLAIN_PORT": str(params.plain_port), "CA_FILE": str(d / "ca.crt"),
        "CERT_FILE": str(d / "server.crt"), "KEY_FILE": str(d / "server.key"),
    }
    plain = params.plain_port != 0
    stamp = f"# written by `sidetune broker init {d}` (or `sidetune broker refresh`) from {broker_config_dir()}\n"
    if plain:
        server_broker = f"broker_host = \"127.0.0.1\"\nbroker_port = {params.plain_port}   # the loopback plaintext listener\n"
    else:
        server_broker = (f"broker_host = \"127.0.0.1\"\nbroker_port = {params.tls_port}   # TLS (no plaintext listener)\n"
                         f"broker_ca_file = {_toml_str(d / 'ca.crt')}\n")
    server_toml = (
        f"# The side server's configuration for the broker in {d}\n{stamp}"
        "# Every other key has its default (deploy/server.example.toml documents them all).\n"
        f"{server_broker}broker_username = \"{SERVER_USER}\"\n"
        f"broker_password_file = {_toml_str(d / 'server.password')}\n"
        f"redis_url = \"redis://127.0.0.1:{params.redis_port}/0\"\n"
        f"redis_password_file = {_toml_str(d / 'redis.password')}\n"
    )
    redis_conf = (render("redis.conf", {}).rstrip("\n") + "\n\n" + stamp +
                  "# Standalone: redis-server THIS_FILE --dir A_WRITABLE_FOLDER (no `dir` here, so Debian's\n"
                  "# redis can `include` this file and keep its own /var/lib/redis).\n"
                  f"port {params.redis_port}\nbind 127.0.0.1\nrequirepass {redis_pw}\n")
    written = [
        _write(d / "acl", (broker_config_dir() / "acl").read_text(), 0o644),
        _write(d / "server.toml", server_toml, 0o644),
        _write(d / "redis.conf", redis_conf, 0o600),
        _write(d / "mosquitto.conf", stamp + mosquitto_standalone(values, plain=plain), 0o644),
        _write(d / "conf.d" / "sidetune.conf", stamp + "# Copy or link it into /etc/mosquitto/conf.d/ "
               "(Debian's stock mosquitto.conf includes that folder).\n" + mosquitto_fragment(values, plain=plain),
               0o644),
    ]
    _give_to_broker(d, params)
    return written


def init_broker(directory: Path, params: BrokerParams, *, force: bool = False) -> list[Path]:
    """Write a complete broker folder (see the module's docstring). Returns the files written."""
    params.check()
    d = directory.absolute()
    if d.exists() and not d.is_dir():
        raise UsageError(f"{d} exists and is not a folder")
    if d.is_dir() and any(d.iterdir()):
        if not force:
            raise UsageError(f"{d} already exists; pass --force to replace its broker "
                             "(a new CA and new passwords: every board then needs its new bundle)")
        for name in _OWN_FILES:
            (d / name).unlink(missing_ok=True)
        if (d / "devices").is_dir():
            shutil.rmtree(d / "devices")
    find_binary("mosquitto_passwd", "mosquitto")  # fail before writing anything
    _mkdirs(d)
    d.chmod(0o755)  # the broker user traverses it; the secrets inside are 0600/0640
    make_ca(d)
    make_server_cert(d, params.hostnames)
    server_pw = new_password()
    _write(d / "server.password", server_pw + "\n", 0o600)
    _write(d / "redis.password", new_password() + "\n", 0o600)
    (d / "passwd").unlink(missing_ok=True)
    set_passwords(d / "passwd", {SERVER_USER: server_pw})
    (d / "devices").mkdir(mode=0o700, exist_ok=True)
    _write(d / BROKER_JSON, json.dumps({"version": 1, **asdict(params)}, indent=2) + "\n", 0o644)
    written = [d / n for n in ("ca.key", "ca.crt", "server.crt", "server.key", "server.password",
                               "redis.password", "passwd", BROKER_JSON)]
    return written + write_configs(d, params)


# ------------------------------------------------------------------ devices


def accounts(directory: Path) -> list[str]:
    """The user names in DIR/passwd."""
    try:
        lines = (directory / "passwd").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.split(":", 1)[0] for line in lines if ":" in line]


def _device_id(device_id: str) -> str:
    try:
        check_device_id(device_id)
    except WireError as e:
        raise UsageError(str(e)) from None
    if device_id == SERVER_USER:
        raise UsageError(f"{SERVER_USER!r} is the side server's account, not a device id")
    return device_id


def add_device(directory: Path, device_id: str, *, broker_host: str | None = None,
               rotate: bool = False) -> Path:
    """Create (or, with ``rotate``, re-key) the account ``device_id`` and write its bundle
    DIR/devices/ID/ (edge.toml, ca.crt, edge.password 0600). Returns the bundle folder."""
    d = directory.absolute()
    params = load_params(d)
    _device_id(device_id)
    bundle = d / "devices" / device_id
    exists = device_id in accounts(d) or bundle.exists()
    if exists and not rotate:
        raise UsageError(f"device {device_id} already exists in {d}; --rotate gives it a new password")
    if rotate and not exists:
        raise UsageError(f"no device {device_id} in {d} to rotate")
    if broker_host is None:
        broker_host = params.hostnames[0] if params.hostnames else "localhost"
    cert_names = {san_entry(h) for h in (*params.hostnames, "localhost", "127.0.0.1")}
    if san_entry(broker_host) not in cert_names:
        raise UsageError(f"--broker-host {broker_host} is not in the server certificate "
                         f"({', '.join(sorted(n.split(':', 1)[1] for n in cert_names))}); a board could not "
                         "verify it: use one of those, or `sidetune broker init --force` with it")
    password = new_password()
    edge_toml = (
        f"# Board {device_id}: written by `sidetune broker add-device {device_id} --dir {d}`.\n"
        "# deploy/install-board.sh --bundle installs this folder into /etc/sidetune/; every other key\n"
        "# has its default (deploy/edge.example.toml documents them all).\n"
        f"device_id = \"{device_id}\"   # also its MQTT user name\n"
        f"password_file = {_toml_str(BOARD_PASSWORD_FILE)}\n"
        f"broker_host = {_toml_str(broker_host)}\n"
        f"broker_port = {params.tls_port}   # TLS\n"
        f"broker_ca_file = {_toml_str(BOARD_CA_FILE)}\n"
        f"state_dir = {_toml_str(BOARD_STATE_DIR)}\n"
        f"backbone_dir = {_toml_str(BOARD_BACKBONE_DIR)}\n"
        f"task_file = {_toml_str(BOARD_TASK_FILE)}\n"
    )
    (d / "devices").mkdir(mode=0o700, exist_ok=True)
    bundle.mkdir(mode=0o700, exist_ok=True)
    _write(bundle / "edge.toml", edge_toml, 0o644)
    _write(bundle / "ca.crt", (d / "ca.crt").read_text(), 0o644)
    _write(bundle / "edge.password", password + "\n", 0o600)
    set_passwords(d / "passwd", {device_id: password})
    return bundle


def remove_device(directory: Path, device_id: str) -> None:
    """Delete the account ``device_id`` and its bundle."""
    d = directory.absolute()
    load_params(d)
    _device_id(device_id)
    bundle = d / "devices" / device_id
    if device_id not in accounts(d) and not bundle.exists():
        raise UsageError(f"no device {device_id} in {d}")
    if device_id in accounts(d):
        proc = subprocess.run([find_binary("mosquitto_passwd", "mosquitto"), "-D", str(d / "passwd"), device_id],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SidetuneError(f"mosquitto_passwd -D {device_id} failed: {(proc.stderr or proc.stdout).strip()}")
    shutil.rmtree(bundle, ignore_errors=True)


# ------------------------------------------------------------------ reload


def _live_mosquitto(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm == "mosquitto" else None


def _system_broker_uses(directory: Path) -> bool:
    """Debian's mosquitto loads this folder's fragment (a link to it, or the same text)."""
    ours = directory / "conf.d" / "sidetune.conf"
    try:
        return SYSTEM_FRAGMENT.resolve() == ours.resolve() or SYSTEM_FRAGMENT.read_bytes() == ours.read_bytes()
    except OSError:
        return False


def reload_broker(directory: Path) -> tuple[bool, str]:
    """SIGHUP the running mosquitto that uses DIR (it then re-reads the password file and ACL).
    Returns (done, a sentence for the operator: what was done, or exactly how to do it)."""
    d = directory.absolute()
    pid_files = [d / "state" / "mosquitto.pid"]
    if _system_broker_uses(d):
        pid_files.append(SYSTEM_PID_FILE)
    done = []
    for pid_file in pid_files:
        pid = _live_mosquitto(pid_file)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as e:
            return False, (f"could not signal mosquitto (pid {pid} in {pid_file}): {e.strerror}; "
                           f"reload it yourself: kill -HUP $(cat {pid_file})")
        done.append(f"pid {pid} from {pid_file}")
    if done:
        return True, f"mosquitto reloaded (SIGHUP to {', '.join(done)}): the change applies to new connections now"
    return False, ("no running mosquitto uses this folder that I could find; after starting it, or if it runs "
                   f"elsewhere, reload it: `systemctl reload mosquitto` (Debian's broker with "
                   f"{SYSTEM_FRAGMENT}) or `kill -HUP $(cat {d / 'state' / 'mosquitto.pid'})` "
                   f"(the standalone {d / 'mosquitto.conf'})")
