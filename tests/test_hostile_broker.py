"""Hostile devices against the broker as shipped (broker_config/, the `mosquitto` fixture).

Each attacker is a raw paho client with its OWN valid device account on the TLS listener,
as a stolen board would be; the server is a raw paho client of the server account on the
loopback plaintext listener (as the workers connect), subscribed in a secret share group
(`sidetune broker init` generates one). Attack classes of issue 9 answered by the broker:

3. shared-subscription hijack: mosquitto 2.0.11 lets any account subscribe to any
   ``$share/...`` filter (its acl_file checks no subscription); a device that does not
   know the server's group name only makes groups of its own, which take nothing;
4. client-id takeover: on the TLS listener the client id is the user name
   (``use_username_as_clientid``): asking for another's id gets the attacker its own;
5. broker memory: per-session queue bounds (``max_queued_bytes``), a device reads
   nothing it writes, and retained uplinks, which mosquitto cannot refuse, are one per
   topic and never reach the server's shared subscription.

Memory is mosquitto's VmRSS (/proc/PID/status). Traffic stays on loopback and is bounded
in count and time. Measured here (`scripts/test -q tests/test_hostile_broker.py -s`; in
brackets, the same tests with the configuration before the hardening):

* 33 x 16 MiB published by a device to its own topics, its session parked: +0 MiB (+224);
* 48 x 16 MiB flooded into a parked server worker's session: +544 MiB, 32 kept (+784, all).
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from schemas import encode, subscription, topic
from schemas.topics import DOWNLINK_KINDS, UPLINK_KINDS
from sidetune.services import SERVER_USER, Mosquitto, new_share_group
from tests.test_broker import Peer, as_device, ok

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MiB = 1024 * 1024
MAX_QUEUED_BYTES = 512 * MiB  # broker_config/sidetune.conf
MAX_QUEUED_MESSAGES = 10_000


def _config_value(mosquitto: Mosquitto, key: str) -> str:
    for line in (mosquitto.state_dir / "mosquitto.conf").read_text().splitlines():
        if line.startswith(key + " "):
            return line.split()[1]
    raise AssertionError(f"{key} not in the rendered configuration")


def rss(mosquitto: Mosquitto) -> int:
    """mosquitto's resident memory, bytes."""
    assert mosquitto.proc is not None
    for line in Path(f"/proc/{mosquitto.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Session:
    """A raw paho client whose session we control: clean start or not, an expiry, a Receive Maximum."""

    def __init__(self, mosquitto: Mosquitto, user: str, password: str, *, client_id: str | None = None,
                 tls: bool = False, clean_start: bool = True, expiry: int = 0, receive_maximum: int = 64) -> None:
        self.mosquitto, self.tls = mosquitto, tls
        self.client_id = client_id or f"{user}-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        if tls:
            self.client.tls_set(ca_certs=str(mosquitto.ca_file))
        self.client.reconnect_delay_set(min_delay=30, max_delay=60)  # a kicked client stays kicked
        self.clean_start, self.expiry, self.receive_maximum = clean_start, expiry, receive_maximum
        self.peer = Peer(self.client)
        self.connects: list[Any] = []
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        _open.append(self)

    def _on_connect(self, c: Any, ud: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connects.append((rc, flags.session_present))
        self._connected.set()

    def connect(self) -> Session:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.expiry
        props.ReceiveMaximum = self.receive_maximum
        self._connected.clear()
        self.client.connect("127.0.0.1", self.mosquitto.tls_port if self.tls else self.mosquitto.port,
                            keepalive=30, clean_start=self.clean_start, properties=props)
        self.client.loop_start()
        assert self._connected.wait(10), "no CONNACK"
        rc, _ = self.connects[-1]
        assert not rc.is_failure, rc
        return self

    @property
    def session_present(self) -> bool:
        return bool(self.connects[-1][1])

    def park(self) -> None:
        """Disconnect, leaving the session (and whatever the broker queues for it) behind."""
        self.client.disconnect()
        self.client.loop_stop()

    def close(self) -> None:
        """End the session for good: connect with a clean start and an expiry of 0, disconnect."""
        try:
            self.client.disconnect()
        except Exception:
            pass
        self.client.loop_stop()
        self.clean_start, self.expiry = True, 0
        try:
            self.connect()
            self.client.disconnect()
        finally:
            self.client.loop_stop()


_open: list[Session] = []


@pytest.fixture(autouse=True)
def _disconnect_every_session() -> Any:
    """Every client a test made is disconnected after it: a spy left connected in some
    share group would take messages from later tests."""
    yield
    while _open:
        s = _open.pop()
        try:
            if s.expiry:
                s.close()  # a session left parked would keep its queue (up to max_queued_bytes)
            else:
                s.client.disconnect()
        except Exception:
            pass
        s.client.loop_stop()


@pytest.fixture
def group() -> str:
    """The server's share group, a secret as `sidetune broker init` makes it."""
    return new_share_group()


def two_devices(device_account: tuple[str, str], broker_accounts: dict[str, str]) -> tuple[str, str]:
    """A fresh pool device (the victim) and one of dev-a..dev-f (an attacker), distinct."""
    victim = device_account[0]
    return victim, ("dev-a" if victim != "dev-a" else "dev-b")


# --------------------------------------------------------------------------- 4. client-id takeover


def test_the_tls_listener_binds_the_client_id_to_the_account(mosquitto):
    conf = (mosquitto.state_dir / "mosquitto.conf").read_text()
    tls_block = conf[conf.index(f"listener {mosquitto.tls_port} "):conf.index(f"listener {mosquitto.port} ")]
    assert "\nuse_username_as_clientid true\n" in tls_block
    plain_block = conf[conf.index(f"listener {mosquitto.port} "):]
    assert "use_username_as_clientid" not in plain_block  # the workers share one account under their own ids


def test_a_device_cannot_take_another_devices_client_id(mosquitto, device_account, broker_accounts):
    victim, attacker = two_devices(device_account, broker_accounts)
    log_start = len(mosquitto.log.read_bytes())
    # the board's session: persistent, subscribed to its downlinks, connected over TLS with the
    # id the agent sends (edge-<id>; the broker makes it <id>)
    board = Session(mosquitto, victim, broker_accounts[victim], client_id=f"edge-{victim}", tls=True,
                    clean_start=False, expiry=600)
    board.connect()
    for kind in DOWNLINK_KINDS:
        board.peer.subscribe(subscription(kind, victim))
    srv = Peer(Session(mosquitto, SERVER_USER, broker_accounts[SERVER_USER]).connect().client)
    # the attacker asks for every id the victim could have, with a clean start (which would wipe it)
    for cid in (f"edge-{victim}", victim):
        thief = Session(mosquitto, attacker, broker_accounts[attacker], client_id=cid, tls=True)
        thief.connect()
        assert not thief.session_present
    time.sleep(0.3)
    assert board.peer.disconnects == [] and board.client.is_connected(), "the victim was kicked"
    t, p = encode(as_device("progress", victim))
    assert ok(srv.publish(t, p))
    assert [m.payload for m in board.peer.wait_messages(1, topic_=t)] == [p]
    # parked: 3 downlinks queue for it; thieves come again; it gets all 3 when it returns
    board.park()
    queued = [encode(as_device(k, victim)) for k in ("cache", "progress", "errors")]
    for t, p in queued:
        assert ok(srv.publish(t, p))
    for cid in (f"edge-{victim}", victim):
        thief = Session(mosquitto, attacker, broker_accounts[attacker], client_id=cid, tls=True)
        thief.connect()
    board.connect()
    assert board.session_present, "the victim's session was destroyed"
    got = board.peer.wait_messages(4)
    assert [m.payload for m in got[1:]] == [p for _, p in queued]
    # the broker's log: every thief connected under its own account's id, whatever it asked for
    log = mosquitto.log.read_bytes()[log_start:].decode(errors="replace")
    assert log.count(f" as {attacker} (p5, c1, ") == 4 and f" as edge-{victim} " not in log and f" as {victim} " in log


def test_a_device_cannot_take_a_server_workers_client_id(mosquitto, device_account, broker_accounts, group):
    victim, attacker = two_devices(device_account, broker_accounts)
    worker_id = f"sidetune-server-host-{uuid.uuid4().hex[:6]}-1"  # predictable in a real fleet
    worker = Session(mosquitto, SERVER_USER, broker_accounts[SERVER_USER], client_id=worker_id,
                     clean_start=False, expiry=600)
    worker.connect()
    worker.peer.subscribe(subscription("jobs", share_group=group))
    board = Peer(Session(mosquitto, victim, broker_accounts[victim], tls=True).connect().client)
    for _ in range(3):  # the attacker retook the id 12 times in 21 s; here each gets its own id
        Session(mosquitto, attacker, broker_accounts[attacker], client_id=worker_id, tls=True).connect()
    sent = [encode(as_device("jobs", victim)) for _ in range(10)]
    for t, p in sent[:5]:
        assert ok(board.publish(t, p))
    worker.peer.wait_messages(5)
    assert worker.peer.disconnects == [] and worker.client.is_connected(), "the worker was kicked"
    # the worker's session parked (a restart): uplinks queue for it, the thief comes, none is lost
    worker.park()
    for t, p in sent[5:]:
        assert ok(board.publish(t, p))
    thief = Session(mosquitto, attacker, broker_accounts[attacker], client_id=worker_id, tls=True)
    thief.connect()
    worker.connect()
    assert worker.session_present
    got = worker.peer.wait_messages(10)
    assert [m.payload for m in got] == [p for _, p in sent]
    worker.close()


# --------------------------------------------------------------------------- 3. shared-subscription hijack


def test_devices_share_subscriptions_take_nothing_from_the_servers_group(mosquitto, device_account, broker_accounts,
                                                                         group):
    victim, _ = device_account
    attackers = [d for d in ("dev-a", "dev-b", "dev-c", "dev-d") if d != victim][:3]
    srv = Peer(Session(mosquitto, SERVER_USER, broker_accounts[SERVER_USER]).connect().client)
    for kind in UPLINK_KINDS:
        assert [rc.value for rc in srv.subscribe(subscription(kind, share_group=group))] == [1]
    guesses = ("workers", "sidetune", "server", "sidetune-server", "w", "$share", group[:-1], group.upper())
    spies = []
    for a in attackers:
        spy = Peer(Session(mosquitto, a, broker_accounts[a], tls=True).connect().client)
        spies.append(spy)
        for g in guesses:
            for kind in UPLINK_KINDS:
                # granted: mosquitto 2.0.11 checks no subscription (see broker_config/acl)
                assert [rc.value for rc in spy.subscribe(subscription(kind, share_group=g))] == [1]
        spy.subscribe("sidetune/v1/+/jobs")
        spy.subscribe("#")
    board = Peer(Session(mosquitto, victim, broker_accounts[victim], tls=True).connect().client)
    sent = []
    for i in range(100):
        kind = ("jobs", "activations", "status")[i % 3]
        t, p = encode(as_device(kind, victim))
        assert ok(board.publish(t, p))
        sent.append(p)
    def live() -> list[bytes]:  # (a new subscription also gets other devices' retained status)
        return [m.payload for m in srv.messages if not m.retain]

    srv._wait(lambda: len(live()) >= 100, 10, "100 uplinks")
    time.sleep(0.3)
    assert sorted(live()) == sorted(sent)  # all 100, once each
    assert all(spy.messages == [] for spy in spies)  # and the read ACL gave them nothing


def test_the_group_name_is_the_defence(mosquitto, device_account, broker_accounts, group):
    """What the secret protects against: an attacker who knows the name takes its share."""
    victim, attacker = two_devices(device_account, broker_accounts)
    srv = Peer(Session(mosquitto, SERVER_USER, broker_accounts[SERVER_USER]).connect().client)
    srv.subscribe(subscription("jobs", share_group=group))
    spy = Peer(Session(mosquitto, attacker, broker_accounts[attacker], tls=True).connect().client)
    spy.subscribe(subscription("jobs", share_group=group))
    board = Peer(Session(mosquitto, victim, broker_accounts[victim], tls=True).connect().client)
    for _ in range(20):
        t, p = encode(as_device("jobs", victim))
        assert ok(board.publish(t, p))
    time.sleep(0.5)
    assert 0 < len(srv.messages) < 20 and spy.messages == []  # the rest went to the spy and were dropped


# --------------------------------------------------------------------------- 5. broker memory


def test_queue_bounds_as_shipped(mosquitto):
    assert int(_config_value(mosquitto, "max_queued_bytes")) == MAX_QUEUED_BYTES
    assert int(_config_value(mosquitto, "max_queued_messages")) == MAX_QUEUED_MESSAGES
    assert _config_value(mosquitto, "persistent_client_expiration") == "7d"


def test_a_parked_device_session_holds_nothing_the_device_sends(mosquitto, device_account, broker_accounts):
    """The issue's attack: a session parked with subscriptions to its own topics, then 16 MiB
    publishes to them from a second connection of the same account (and from an accomplice's).
    A device reads nothing it can write, and over TLS its second connection is the same
    session anyway: the parked session stays empty and mosquitto does not grow."""
    me, accomplice = two_devices(device_account, broker_accounts)
    parked = Session(mosquitto, me, broker_accounts[me], client_id=f"park-{uuid.uuid4().hex[:6]}", tls=True,
                     clean_start=False, expiry=0xFFFFFFFF, receive_maximum=1)
    parked.connect()
    for flt in ("#", f"sidetune/v1/{me}/#", topic(me, "status"), topic(me, "jobs"), topic(me, "activations"),
                f"$share/x/sidetune/v1/{me}/status", f"sidetune/v1/{accomplice}/#"):
        parked.peer.subscribe(flt)
    parked.park()
    before = rss(mosquitto)
    big = b"\0" * (16 * MiB)
    offered = 0
    second = Session(mosquitto, me, broker_accounts[me], client_id=f"pub-{uuid.uuid4().hex[:6]}", tls=True,
                     clean_start=False, expiry=0xFFFFFFFF)
    second.connect()
    for i in range(24):
        assert ok(second.peer.publish(topic(me, ("status", "status", "jobs", "activations")[i % 4]), big, timeout=30))
        offered += 1
    second.park()
    other = Peer(Session(mosquitto, accomplice, broker_accounts[accomplice], tls=True).connect().client)
    for i in range(9):
        assert ok(other.publish(topic(accomplice, UPLINK_KINDS[i % len(UPLINK_KINDS)]), big, timeout=30))
        offered += 1
    time.sleep(0.3)
    grown = rss(mosquitto) - before
    print(f"offered {offered} x 16 MiB to a parked device session's topics; mosquitto RSS "
          f"{before / MiB:.0f} -> {(before + grown) / MiB:.0f} MiB (+{grown / MiB:.0f})")
    parked.connect()
    assert parked.session_present
    time.sleep(0.5)
    assert parked.peer.messages == []
    assert second.peer.messages == []
    # a few 16 MiB packets in transit at most (reading, TLS), however many are offered (measured: <= 80 MiB)
    assert grown < 128 * MiB, f"mosquitto grew by {grown / MiB:.0f} MiB"
    parked.close()


def test_a_flood_into_a_parked_server_session_stops_at_max_queued_bytes(mosquitto, device_account, broker_accounts,
                                                                       group):
    """The worst a device can make the broker hold: its uplinks queued for a server worker
    that does not read them (killed, its session kept), bounded at max_queued_bytes; past it,
    uplinks to that worker are dropped (the trade-off the bound states)."""
    victim, attacker = two_devices(device_account, broker_accounts)
    worker = Session(mosquitto, SERVER_USER, broker_accounts[SERVER_USER], clean_start=False, expiry=600)
    worker.connect()
    worker.peer.subscribe(subscription("jobs", share_group=group))
    worker.park()
    before = rss(mosquitto)
    big = b"\0" * (16 * MiB)
    flood = Peer(Session(mosquitto, attacker, broker_accounts[attacker], tls=True).connect().client)
    offered = 48  # 768 MiB: unbounded, mosquitto would hold all of it
    start = time.monotonic()
    peak = before
    for _ in range(offered):
        assert ok(flood.publish(topic(attacker, "jobs"), big, timeout=30))  # PUBACKed, kept or not
        peak = max(peak, rss(mosquitto))
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    peak = max(peak, rss(mosquitto))
    grown = peak - before
    print(f"offered {offered} x 16 MiB in {elapsed:.1f} s; mosquitto RSS {before / MiB:.0f} -> {peak / MiB:.0f} MiB "
          f"(+{grown / MiB:.0f})")
    # the queue, plus a few packets in transit (as in the test above)
    assert grown < MAX_QUEUED_BYTES + 128 * MiB, f"mosquitto grew by {grown / MiB:.0f} MiB"
    assert f"Outgoing messages are being dropped for client {worker.client_id}" in \
        mosquitto.log.read_text(errors="replace")
    # the worker comes back: it gets what fitted under max_queued_bytes, and a victim's uplink is dropped
    # while the queue is full (the trade-off of a bound: the server asks a board again for what it lacks)
    board = Peer(Session(mosquitto, victim, broker_accounts[victim], tls=True).connect().client)
    assert ok(board.publish(*encode(as_device("jobs", victim))))
    worker.connect()
    assert worker.session_present
    got = worker.peer.wait_messages(MAX_QUEUED_BYTES // len(big), timeout=60)
    time.sleep(1.0)
    assert len(worker.peer.messages) == len(got) == MAX_QUEUED_BYTES // len(big)
    assert all(m.topic == topic(attacker, "jobs") for m in got)
    worker.close()


# --------------------------------------------------------------------------- 5. retained uplinks


def subscribe_without_retained(peer: Peer, flt: str) -> None:
    """MQTT v5 Retain Handling 2: the broker sends no retained message for this subscription."""
    rc, mid = peer.client.subscribe(flt, options=SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
    assert rc == mqtt.MQTT_ERR_SUCCESS
    peer._wait(lambda: mid in peer.subacks, 5, f"SUBACK for {flt}")
    assert [r.value for r in peer.subacks[mid]] == [1]


def test_retained_uplinks_cannot_be_refused_and_what_the_server_must_do(mosquitto, broker_accounts, group):
    """mosquitto 2.0.11 accepts a device's retained publish on its own uplinks (retain_available
    is global; the ACL file ignores the retain flag) and keeps one per topic. It sends them to
    a new SHARED subscription too, flagged retained; with Retain Handling 2 it sends none. A
    live message arrives with the flag cleared, retained or not. The server account cannot
    clear them (it writes no uplink)."""
    attacker = "dev-e"
    dev = Peer(Session(mosquitto, attacker, broker_accounts[attacker], tls=True).connect().client)
    payload = {k: f"retained {k} 2".encode() * 1000 for k in UPLINK_KINDS}
    try:
        for kind in UPLINK_KINDS:
            for i in range(3):
                assert ok(dev.publish(topic(attacker, kind), f"retained {kind} {i}".encode() * 1000, retain=True))
        # a worker subscribing as today (default options) gets each topic's last one, flagged retained
        plain = Peer(Session(mosquitto, SERVER_USER, broker_accounts[SERVER_USER]).connect().client)
        for kind in UPLINK_KINDS:
            plain.subscribe(subscription(kind, attacker, share_group=group))
        plain.wait_messages(len(UPLINK_KINDS))
        time.sleep(0.3)
        assert sorted((m.topic, m.payload, m.retain) for m in plain.messages) == sorted(
            (topic(attacker, k), payload[k], True) for k in UPLINK_KINDS)
        # with Retain Handling 2 nothing is replayed; live messages arrive unflagged, retained or not
        quiet = Peer(Session(mosquitto, SERVER_USER, broker_accounts[SERVER_USER]).connect().client)
        for kind in ("jobs", "activations"):
            subscribe_without_retained(quiet, subscription(kind, attacker, share_group=group + "-q"))
        assert ok(dev.publish(topic(attacker, "jobs"), b"live", retain=False))
        assert ok(dev.publish(topic(attacker, "activations"), b"live retained", retain=True))
        quiet.wait_messages(2)
        time.sleep(0.3)
        assert sorted((m.payload, m.retain) for m in quiet.messages) == [(b"live", False), (b"live retained", False)]
        # the server cannot clear them
        srv = Peer(Session(mosquitto, SERVER_USER, broker_accounts[SERVER_USER]).connect().client)
        assert srv.publish(topic(attacker, "jobs"), b"", retain=True).getName() == "Not authorized"
    finally:  # the device can
        for kind in UPLINK_KINDS:
            dev.publish(topic(attacker, kind), b"", retain=True)
    late = Peer(Session(mosquitto, SERVER_USER, broker_accounts[SERVER_USER]).connect().client)
    for kind in UPLINK_KINDS:
        late.subscribe(subscription(kind, attacker))
    time.sleep(0.3)
    assert late.messages == []
