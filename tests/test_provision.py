"""`sidetune broker init / add-device / remove-device` against a real mosquitto and redis-server.

Every broker here is started from the folder the command wrote, on free loopback ports:
standalone (`mosquitto -c DIR/mosquitto.conf`), and as the conf.d fragment under a copy of
Debian's stock /etc/mosquitto/mosquitto.conf (tests/data/debian-mosquitto.conf, only its paths
rewritten). Boards connect over TLS with nothing but their bundle (edge.toml, ca.crt,
edge.password).
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidetune.cli import main
from sidetune.services import ServiceError, _stop, _wait_for_port, find_binary, free_port

pytestmark = pytest.mark.integration

DEBIAN_CONF = Path(__file__).parent / "data" / "debian-mosquitto.conf"
OK = "ok"


# ------------------------------------------------------------------ helpers (test_install.py uses them too)


def sidetune(*argv: str) -> int:
    return main(list(argv))


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def init_broker(directory: Path, *extra: str, user: str | None = None) -> dict[str, int]:
    """`sidetune broker init` on free loopback ports; returns the ports."""
    tls, plain, redis_port = free_ports(3)
    rc = sidetune("broker", "init", str(directory), "--hostname", "localhost", "--bind", "127.0.0.1",
                  "--tls-port", str(tls), "--plain-port", str(plain), "--redis-port", str(redis_port),
                  "--user", user or getpass.getuser(), *extra)
    assert rc == 0
    return {"tls": tls, "plain": plain, "redis": redis_port}


def login(port: int, user: str, password: str, *, ca_file: Path | str | None = None, host: str = "localhost",
          publish: str | None = None, timeout: float = 5.0) -> str:
    """Connect with MQTT v5 (TLS when ``ca_file``), optionally publish QoS 1 to ``publish``:
    "ok", or why not."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:10]}", protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    if ca_file is not None:
        c.tls_set(ca_certs=str(ca_file))
    connected, acked = threading.Event(), threading.Event()
    res: dict[str, object] = {}

    def on_connect(client: object, userdata: object, flags: object, rc: object, props: object) -> None:
        res.setdefault("rc", rc)
        connected.set()

    def on_publish(client: object, userdata: object, mid: int, rc: object, props: object) -> None:
        res["pub"] = rc
        acked.set()

    c.on_connect = on_connect
    c.on_disconnect = on_connect
    c.on_publish = on_publish
    try:
        c.connect(host, port, keepalive=10)
    except OSError as e:  # ssl.SSLError too
        return f"connect failed: {e}"
    c.loop_start()
    try:
        if not connected.wait(timeout):
            return "no CONNACK"
        rc = res["rc"]
        if getattr(rc, "is_failure", True):
            return f"refused: {rc}"
        if publish:
            c.publish(publish, b"hello", qos=1)
            if not acked.wait(timeout):
                return "no PUBACK"
            if getattr(res["pub"], "is_failure", False):
                return f"publish refused: {res['pub']}"
        return OK
    finally:
        c.disconnect()
        c.loop_stop()


def eventually(check: Callable[[], str], want: Callable[[str], bool], seconds: float = 5.0) -> str:
    """Call ``check`` until ``want(result)`` or ``seconds`` pass; the last result."""
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if want(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def unauthenticated_ping(port: int) -> str:
    """Redis's answer to a PING without a password (redis-py would retry for seconds)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(200).decode()


def board_settings(bundle_toml: Path, **paths: object):  # noqa: ANN201
    """The board's settings from its edge.toml, with only the given paths rewritten."""
    from edge_agent.config import EdgeSettings
    from schemas.settings import load_settings

    return load_settings(EdgeSettings, bundle_toml, **paths)


def stock_config(tmp: Path, fragment: Path | None, broker_user: str | None, include_dir: Path | None = None) -> Path:
    """Debian's stock mosquitto.conf with only its paths pointed into ``tmp``, and ``fragment``
    copied into its include_dir (or ``include_dir``, an installed /etc/mosquitto/conf.d)."""
    run, lib, log = (tmp / n for n in ("run", "lib", "log"))
    confd = include_dir or tmp / "conf.d"
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o755)
    for d in (run, lib, log, confd):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        if broker_user:  # what Debian's package and unit do for its user
            acct = pwd.getpwnam(broker_user)
            os.chown(d, acct.pw_uid, acct.pw_gid)
    text = DEBIAN_CONF.read_text()
    for key, value in (("pid_file", f"{run}/mosquitto.pid"), ("persistence_location", f"{lib}/"),
                       ("log_dest", f"file {log}/mosquitto.log"), ("include_dir", str(confd))):
        text, n = re.subn(rf"^{key} .*$", f"{key} {value}", text, flags=re.M)
        assert n == 1, key
    if fragment is not None:
        shutil.copy(fragment, confd / "sidetune.conf")
    conf = tmp / "mosquitto.conf"
    conf.write_text(text)
    return conf


Starter = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start() -> Iterator[Starter]:
    """start(args, port, log, what): a server process, waited for on its port, stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(args: list[str], port: int, log: Path, what: str) -> subprocess.Popen[bytes]:
        import tempfile

        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
            procs.append(proc)
            try:
                _wait_for_port(proc, port, log, what)
            except ServiceError as e:
                err.seek(0)
                pytest.fail(f"{e}\nstderr: {err.read().decode(errors='replace')[-2000:]}", pytrace=False)
        return proc

    yield run
    for proc in procs:
        _stop(proc)


def mosquitto_bin() -> str:
    return find_binary("mosquitto", "mosquitto")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary folder others can traverse: a root-started mosquitto reads its files as its own
    user (pytest's tmp_path sits under a 0700 folder)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="sidetune-prov-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ (a) standalone, (c) TLS, (e) modes


def test_init_writes_a_standalone_broker_a_board_connects_to_over_tls(tmp_path, start):
    d = tmp_path / "broker"
    ports = init_broker(d)
    start([mosquitto_bin(), "-c", str(d / "mosquitto.conf")], ports["tls"], d / "state" / "mosquitto.log",
          "standalone mosquitto")
    assert sidetune("broker", "add-device", "board-1", "--dir", str(d)) == 0
    bundle = d / "devices" / "board-1"
    assert sorted(p.name for p in bundle.iterdir()) == ["ca.crt", "edge.password", "edge.toml"]
    s = board_settings(bundle / "edge.toml", password_file=bundle / "edge.password",
                       broker_ca_file=str(bundle / "ca.crt"))
    assert (s.device_id, s.broker_host, s.broker_port) == ("board-1", "localhost", ports["tls"])
    password = s.broker_password()

    # the board's own topic, over TLS, with its bundle only
    assert login(s.broker_port, "board-1", password, ca_file=s.broker_ca_file,
                 publish="sidetune/v1/board-1/status") == OK
    # and nobody else's topic (the ACL)
    assert login(s.broker_port, "board-1", password, ca_file=s.broker_ca_file,
                 publish="sidetune/v1/board-2/status").startswith("publish refused")
    # a wrong password, a wrong CA, plaintext on the TLS port: refused
    assert login(s.broker_port, "board-1", password + "x", ca_file=s.broker_ca_file).startswith("refused")
    from sidetune.certs import make_ca

    other = make_ca(tmp_path / "other-ca")
    assert "certificate verify failed" in login(s.broker_port, "board-1", password, ca_file=other)
    assert login(s.broker_port, "board-1", password, timeout=3) != OK
    # the side server, with server.toml as written, on the loopback plaintext listener
    from schemas.settings import load_settings
    from side_server.config import ServerSettings

    srv = load_settings(ServerSettings, d / "server.toml")
    assert (srv.broker_host, srv.broker_port, srv.broker_ca_file) == ("127.0.0.1", ports["plain"], None)
    assert login(srv.broker_port, srv.broker_username, srv.broker_password_value(), host=srv.broker_host,
                 publish="sidetune/v1/board-1/progress") == OK
    # its share group is a generated secret (tests/test_hostile_broker.py: why), kept in broker.json
    assert re.fullmatch(r"w-[0-9a-f]{32}", srv.share_group)
    assert json.loads((d / "broker.json").read_text())["share_group"] == srv.share_group


def test_plaintext_listens_on_loopback_only_and_can_be_off(tmp_path, start):
    d = tmp_path / "broker"
    init_broker(d)
    for conf in (d / "mosquitto.conf", d / "conf.d" / "sidetune.conf"):
        blocks = re.split(r"^(?=listener )", conf.read_text(), flags=re.M)[1:]
        assert len(blocks) == 2, conf
        for block in blocks:
            port, bind = block.split("\n")[0].split()[1:]
            assert "cafile " in block or bind == "127.0.0.1", block
        assert "require_certificate false" in blocks[0] and "tls_version tlsv1.2" in blocks[0]
        # the boards' listener binds the client id to the account; the server's keeps its workers' ids
        assert "\nuse_username_as_clientid true\n" in blocks[0] and "use_username_as_clientid" not in blocks[1]

    # --plain-port 0: TLS only, and the side server is pointed at it with the CA
    d0 = tmp_path / "tls-only"
    ports = init_broker(d0, "--plain-port", "0")
    assert ports  # (the plain port chosen is overridden by 0)
    assert "ONE worker only" in (d0 / "server.toml").read_text()
    text = (d0 / "mosquitto.conf").read_text()
    assert len(re.findall(r"^listener ", text, flags=re.M)) == 1
    from schemas.settings import load_settings
    from side_server.config import ServerSettings

    srv = load_settings(ServerSettings, d0 / "server.toml")
    assert srv.broker_port == ports["tls"] and srv.broker_ca_file == str(d0 / "ca.crt")
    start([mosquitto_bin(), "-c", str(d0 / "mosquitto.conf")], ports["tls"], d0 / "state" / "mosquitto.log",
          "mosquitto")
    assert login(srv.broker_port, srv.broker_username, srv.broker_password_value(), host=srv.broker_host,
                 ca_file=srv.broker_ca_file) == OK


def test_secrets_are_0600_and_the_certificate_names_every_host(tmp_path):
    d = tmp_path / "broker"
    assert sidetune("broker", "init", str(d), "--hostname", "broker.example.lan", "--hostname", "10.0.0.7",
                    "--user", getpass.getuser()) == 0
    assert sidetune("broker", "add-device", "board-9", "--dir", str(d), "--no-reload") == 0
    for name in ("ca.key", "server.password", "redis.password", "redis.conf", "passwd", "server.key",
                 "devices/board-9/edge.password"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    for name in ("ca.crt", "server.crt", "devices/board-9/ca.crt"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((d / "devices").stat().st_mode) == 0o700
    san = subprocess.run(["openssl", "x509", "-in", str(d / "server.crt"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, check=True).stdout
    for entry in ("DNS:broker.example.lan", "IP Address:10.0.0.7", "DNS:localhost", "IP Address:127.0.0.1"):
        assert entry in san
    subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.crt"), str(d / "server.crt")], check=True,
                   capture_output=True)
    toml = (d / "devices/board-9/edge.toml").read_text()
    assert 'broker_host = "broker.example.lan"' in toml and "broker_port = 8883" in toml
    server_pw = (d / "server.password").read_text().strip()
    assert len(server_pw) >= 30 and server_pw not in (d / "server.toml").read_text()
    # refresh re-renders the configuration and keeps certificates and passwords
    before = {n: (d / n).read_bytes() for n in ("ca.crt", "server.key", "passwd", "redis.password")}
    (d / "mosquitto.conf").write_text("# damaged\n")
    assert sidetune("broker", "refresh", "--dir", str(d)) == 0
    assert "listener 8883" in (d / "mosquitto.conf").read_text()
    assert before == {n: (d / n).read_bytes() for n in before}
    # ... and the share group; a folder from before the secret share group gets one
    group = json.loads((d / "broker.json").read_text())["share_group"]
    assert f'share_group = "{group}"' in (d / "server.toml").read_text()
    old = json.loads((d / "broker.json").read_text())
    del old["share_group"]
    (d / "broker.json").write_text(json.dumps(old))
    assert sidetune("broker", "refresh", "--dir", str(d)) == 0
    new_group = json.loads((d / "broker.json").read_text())["share_group"]
    assert new_group != group and re.fullmatch(r"w-[0-9a-f]{32}", new_group)
    assert sidetune("broker", "refresh", "--dir", str(d)) == 0
    assert f'share_group = "{new_group}"' in (d / "server.toml").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership for the broker's user needs root")
def test_as_root_the_broker_user_reads_its_files_and_owns_its_state(tmp_path):
    d = tmp_path / "broker"
    assert sidetune("broker", "init", str(d), "--user", "mosquitto", "--hostname", "localhost") == 0
    acct = pwd.getpwnam("mosquitto")
    for name in ("passwd", "acl", "server.key"):
        st = (d / name).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, acct.pw_gid, 0o640), name
    st = (d / "state").stat()
    assert (st.st_uid, st.st_gid) == (acct.pw_uid, acct.pw_gid)
    st = (d / "ca.key").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


# ------------------------------------------------------------------ (b) the fragment under Debian's stock config


def test_the_fragment_loads_under_debians_stock_config(shared_tmp, start):
    # Debian's stock config sets no `user`: started as root, mosquitto becomes "mosquitto".
    broker_user = "mosquitto" if os.geteuid() == 0 else None
    d = shared_tmp / "broker"
    ports = init_broker(d, user=broker_user or getpass.getuser())
    fragment = d / "conf.d" / "sidetune.conf"
    text = fragment.read_text()
    for key in ("pid_file", "persistence", "persistence_location", "log_dest", "include_dir", "user"):
        assert not re.search(rf"^{key}\s", text, flags=re.M), f"the fragment repeats {key}"
    conf = stock_config(shared_tmp / "etc", fragment, broker_user)
    start([mosquitto_bin(), "-c", str(conf)], ports["tls"], shared_tmp / "etc" / "log" / "mosquitto.log",
          "mosquitto with the stock config")
    assert sidetune("broker", "add-device", "board-2", "--dir", str(d), "--no-reload") == 0
    # the stock broker is not the folder's standalone one: reload it as Debian's unit does
    pid = int((shared_tmp / "etc" / "run" / "mosquitto.pid").read_text())
    os.kill(pid, 1)
    bundle = d / "devices" / "board-2"
    password = (bundle / "edge.password").read_text().strip()
    got = eventually(lambda: login(ports["tls"], "board-2", password, ca_file=bundle / "ca.crt",
                                   publish="sidetune/v1/board-2/jobs"), lambda r: r == OK)
    assert got == OK


# ------------------------------------------------------------------ (d) a running broker: add, remove, rotate


def test_add_remove_rotate_on_a_running_broker_without_a_restart(tmp_path, start, capsys):
    d = tmp_path / "broker"
    ports = init_broker(d)
    proc = start([mosquitto_bin(), "-c", str(d / "mosquitto.conf")], ports["tls"], d / "state" / "mosquitto.log",
                 "mosquitto")
    ca = d / "ca.crt"

    def board(device: str) -> Callable[[], str]:
        pw_file = d / "devices" / device / "edge.password"
        return lambda: login(ports["tls"], device, pw_file.read_text().strip(), ca_file=ca,
                             publish=f"sidetune/v1/{device}/status")

    capsys.readouterr()
    assert sidetune("broker", "add-device", "board-3", "--dir", str(d)) == 0
    assert f"SIGHUP to pid {proc.pid}" in capsys.readouterr().out
    assert eventually(board("board-3"), lambda r: r == OK) == OK

    old = (d / "devices/board-3/edge.password").read_text().strip()
    assert sidetune("broker", "add-device", "board-3", "--dir", str(d), "--rotate") == 0
    new = (d / "devices/board-3/edge.password").read_text().strip()
    assert new != old
    assert eventually(lambda: login(ports["tls"], "board-3", old, ca_file=ca),
                      lambda r: r.startswith("refused")).startswith("refused")
    assert login(ports["tls"], "board-3", new, ca_file=ca) == OK

    assert sidetune("broker", "remove-device", "board-3", "--dir", str(d)) == 0
    assert not (d / "devices/board-3").exists()
    assert eventually(lambda: login(ports["tls"], "board-3", new, ca_file=ca),
                      lambda r: r.startswith("refused")).startswith("refused")
    assert proc.poll() is None  # never restarted


def test_without_a_running_broker_it_says_how_to_reload(tmp_path, capsys):
    d = tmp_path / "broker"
    init_broker(d)
    capsys.readouterr()
    assert sidetune("broker", "add-device", "board-4", "--dir", str(d)) == 0
    out = capsys.readouterr().out
    assert "systemctl reload mosquitto" in out and f"kill -HUP $(cat {d}/state/mosquitto.pid)" in out


# ------------------------------------------------------------------ (f) Redis


def test_redis_conf_starts_redis_that_requires_the_password(tmp_path, start):
    import redis

    d = tmp_path / "broker"
    ports = init_broker(d)
    (tmp_path / "redis-state").mkdir()
    start([find_binary("redis-server", "redis-server"), str(d / "redis.conf"), "--dir", str(tmp_path / "redis-state"),
           "--logfile", str(tmp_path / "redis.log")], ports["redis"], tmp_path / "redis.log", "redis-server")
    assert unauthenticated_ping(ports["redis"]).startswith("-NOAUTH")
    from schemas.settings import load_settings
    from side_server.config import ServerSettings

    srv = load_settings(ServerSettings, d / "server.toml")
    with redis.Redis.from_url(srv.redis_url, password=srv.redis_password()) as r:
        assert r.ping()
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"


def test_the_test_services_require_a_redis_password(redis_server):
    assert unauthenticated_ping(redis_server.port).startswith("-NOAUTH")
    assert f":{redis_server.password}@" in redis_server.url


# ------------------------------------------------------------------ bad input: exit 2, one line


def _one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert sidetune(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sidetune: error: "), err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    d = tmp_path / "broker"
    init_broker(d)
    ca = (d / "ca.crt").read_bytes()
    assert "--force" in _one_line_error(capsys, "broker", "init", str(d))
    assert "bad host name" in _one_line_error(capsys, "broker", "init", str(tmp_path / "x"), "--hostname", "bad_name!")
    assert "--tls-port" in _one_line_error(capsys, "broker", "init", str(tmp_path / "x"), "--tls-port", "70000")
    assert "--tls-port" in _one_line_error(capsys, "broker", "init", str(tmp_path / "x"), "--tls-port", "abc")
    assert "both" in _one_line_error(capsys, "broker", "init", str(tmp_path / "x"), "--tls-port", "1234",
                                     "--plain-port", "1234")
    assert not (tmp_path / "x").exists()
    assert "bad device id" in _one_line_error(capsys, "broker", "add-device", "../etc", "--dir", str(d))
    assert "server" in _one_line_error(capsys, "broker", "add-device", "sidetune-server", "--dir", str(d))
    # a board's client id is its device id: the server workers' ids (sidetune-server-<worker>) are reserved
    for reserved in ("sidetune-server-host-1", "Sidetune-Server-x", "sidetune-serverless"):
        assert "side server's" in _one_line_error(capsys, "broker", "add-device", reserved, "--dir", str(d))
    assert "not a broker folder" in _one_line_error(capsys, "broker", "add-device", "b1", "--dir", str(tmp_path / "nope"))
    assert "not a broker folder" in _one_line_error(capsys, "broker", "remove-device", "b1", "--dir", str(tmp_path))
    assert "no device" in _one_line_error(capsys, "broker", "remove-device", "b1", "--dir", str(d))
    assert "no device" in _one_line_error(capsys, "broker", "add-device", "b1", "--dir", str(d), "--rotate")
    assert "not in the server certificate" in _one_line_error(capsys, "broker", "add-device", "b1", "--dir", str(d),
                                                              "--broker-host", "elsewhere.lan")
    assert sidetune("broker", "add-device", "b1", "--dir", str(d), "--no-reload") == 0
    assert "--rotate" in _one_line_error(capsys, "broker", "add-device", "b1", "--dir", str(d))
    assert (d / "ca.crt").read_bytes() == ca  # nothing was replaced
    # --force replaces the broker: a new CA, and the old bundles are gone
    assert sidetune("broker", "init", str(d), "--force", "--user", getpass.getuser()) == 0
    assert (d / "ca.crt").read_bytes() != ca and not (d / "devices" / "b1").exists()
