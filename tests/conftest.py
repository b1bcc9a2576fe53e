"""Shared fixtures: a real mosquitto and redis-server, started as shipped.

Services (session scope, started once, stopped at the end of the session):

* ``mosquitto`` -- a :class:`sidetune.services.Mosquitto` in a temporary
  directory, configured from ``broker_config/`` exactly as shipped (ACLs,
  limits, persistence), with the TLS listener enabled
  (``mosquitto.tls_port``, CA in ``mosquitto.ca_file``). Accounts come from
  ``broker_accounts``.
* ``redis_server`` -- a :class:`sidetune.services.RedisServer` started with
  ``broker_config/redis.conf``.

Per module: ``tiny_backbone`` -- the folder of the exported tiny llama
(``tests.tiny_models.exported_tiny``, exported once per session).

A missing binary FAILS the test (``pytest.fail``), it never skips: an
integration suite that silently skips tests nothing.

Per test:

* ``redis_url`` -- ``redis_server.url`` after ``FLUSHALL``: every test
  starts from an empty Redis.
* ``mqtt_client(user, password=None, *, client_id=None, tls=False)`` -- a
  factory of paho-mqtt 2.x clients (``CallbackAPIVersion.VERSION2``, MQTT v5),
  connected (the CONNACK is awaited) and ``loop_start()``-ed. The password
  defaults to ``broker_accounts[user]``; ``user=None`` connects anonymously.
  A refused connection raises :class:`ConnectionRefusedError` whose
  ``reason_code`` attribute is the CONNACK's paho ``ReasonCode``. All clients
  are disconnected at the end of the test.

Device accounts and isolation
-----------------------------
A device's MQTT user name IS its device id, and the ACL pins every device
topic to the user name (``sidetune/v1/%u/...``). So two tests that use the
same device account share topics (and retained messages). Accounts:

* ``sidetune-server`` -- the side server (``SERVER_USER``);
* ``dev-a`` ... ``dev-f`` -- named devices for tests that want fixed names;
* ``dev-00`` ... ``dev-39`` -- a pool; the ``device_account`` fixture hands
  out the next one of these per test as a ``(user, password)`` pair, cycling
  round the pool, so consecutive tests never share a device. Use a fresh
  ``schemas.new_msg_id()`` for the messages of each test as well. A test that
  leaves a retained message behind must clear it (publish an empty retained
  payload) since the pool wraps around after 40 tests;
* ``board-7`` -- the device of ``schemas.vectors.example_messages()``, so the
  test vectors can be published unchanged.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidetune.services import SERVER_USER, Mosquitto, RedisServer, ServiceError

DEVICE_POOL = tuple(f"dev-{i:02d}" for i in range(40))
NAMED_DEVICES = tuple(f"dev-{c}" for c in "abcdef")
VECTOR_DEVICE = "board-7"
CONNECT_TIMEOUT = 10.0

S = TypeVar("S", Mosquitto, RedisServer)


def _require(binary: str, package: str) -> None:
    from sidetune.services import find_binary

    try:
        find_binary(binary, package)
    except ServiceError:
        pytest.fail(f"{binary} not found: apt-get install {package}", pytrace=False)


def _running(service: S, name: str) -> Iterator[S]:
    """Start ``service`` (failing the test if it does not start), hand it out, stop it."""
    try:
        service.start()
    except ServiceError as e:
        pytest.fail(f"{name} did not start: {e}", pytrace=False)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def broker_accounts() -> dict[str, str]:
    """MQTT user -> password for every account the test broker knows."""
    accounts = {SERVER_USER: "server-" + uuid.uuid4().hex[:12]}
    for user in (*NAMED_DEVICES, *DEVICE_POOL, VECTOR_DEVICE):
        accounts[user] = "pw-" + user + "-" + uuid.uuid4().hex[:8]
    return accounts


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory, broker_accounts: dict[str, str]) -> Iterator[Mosquitto]:
    _require("mosquitto", "mosquitto")
    _require("mosquitto_passwd", "mosquitto")
    _require("openssl", "openssl")
    yield from _running(Mosquitto(tmp_path_factory.mktemp("mosquitto"), dict(broker_accounts), tls=True), "mosquitto")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _require("redis-server", "redis-server")
    yield from _running(RedisServer(tmp_path_factory.mktemp("redis")), "redis-server")


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of db 0 of the session's redis-server, emptied (FLUSHALL) for this test."""
    import redis

    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # a previous test stopped it: bring it back
    with redis.Redis.from_url(redis_server.url) as r:
        r.flushall()
    return redis_server.url


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the exported tiny llama (exported once per session)."""
    from tests.tiny_models import exported_tiny

    return exported_tiny(tmp_path_factory, "llama")[0]


_pool = itertools.cycle(DEVICE_POOL)


@pytest.fixture
def device_account(broker_accounts: dict[str, str]) -> tuple[str, str]:
    """A device account (user = device id, password) no other recent test uses."""
    user = next(_pool)
    return user, broker_accounts[user]


@pytest.fixture
def device_accounts(broker_accounts: dict[str, str]) -> Callable[[int], list[tuple[str, str]]]:
    """``n`` device accounts no other recent test uses (a cohort's members, say)."""

    def take(n: int) -> list[tuple[str, str]]:
        users = [next(_pool) for _ in range(n)]
        return [(u, broker_accounts[u]) for u in users]

    return take


MqttFactory = Callable[..., Any]


@pytest.fixture
def mqtt_client(mosquitto: Mosquitto, broker_accounts: dict[str, str]) -> Iterator[MqttFactory]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    made: list[mqtt.Client] = []

    def connect(user: str | None, password: str | None = None, *, client_id: str | None = None,
                tls: bool = False) -> mqtt.Client:
        if password is None and user is not None:
            password = broker_accounts.get(user)
        cid = client_id or f"{user or 'anon'}-{uuid.uuid4().hex[:10]}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        if user is not None:
            client.username_pw_set(user, password)
        if tls:
            client.tls_set(ca_certs=str(mosquitto.ca_file))
        done = threading.Event()
        result: dict[str, object] = {}

        def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
            result.setdefault("rc", rc)
            done.set()

        def on_disconnect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
            result.setdefault("rc", rc)
            done.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        made.append(client)
        client.connect("127.0.0.1", mosquitto.tls_port if tls else mosquitto.port, keepalive=30)
        client.loop_start()
        if not done.wait(CONNECT_TIMEOUT):
            client.loop_stop()
            raise TimeoutError(f"no CONNACK for {user!r} within {CONNECT_TIMEOUT:.0f} s")
        rc = result["rc"]
        if getattr(rc, "is_failure", True):
            client.loop_stop()  # paho would otherwise retry forever
            err = ConnectionRefusedError(f"broker refused {user!r}: {rc}")
            err.reason_code = rc  # type: ignore[attr-defined]
            raise err
        # the test installs its own callbacks from here on
        client.on_connect = None
        client.on_disconnect = None
        return client

    yield connect

    for client in made:
        try:
            client.disconnect()
        except Exception:
            pass
        client.loop_stop()


def pytest_report_header(config: pytest.Config) -> list[str]:
    found = [f"{b}: {shutil.which(b) or shutil.which(b, path='/usr/sbin:/usr/bin') or 'MISSING'}"
             for b in ("mosquitto", "redis-server")]
    return ["services: " + ", ".join(found)]
