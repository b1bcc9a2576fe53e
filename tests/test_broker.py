"""The wire contract through the real mosquitto 2.0, configured exactly as shipped in broker_config/.

QoS 1 and MQTT v5 everywhere. Facts about mosquitto 2.0.11 these tests pin down
(each was observed, then asserted):

* a packet above ``max_packet_size`` is not cut and not delivered: the broker
  drops the publisher's connection ("disconnected due to oversize packet" in
  its log); the publisher never gets a PUBACK;
* a publish the ACL denies gets a PUBACK with reason "Not authorized" (0x87)
  and is delivered to nobody; mosquitto 2.0 then also drops the publisher's
  connection (log: "Bad socket read/write ... Unknown error", upstream issue
  eclipse/mosquitto#2579), so a client must not rely on staying connected;
* a subscription to another device's topic is granted (SUBACK QoS 1: the
  acl_file check happens on delivery), but nothing published there is ever
  delivered to it; a device reads nothing it writes (its status is write-only);
* a wrong password and an anonymous client are refused with "Not authorized".
"""

from __future__ import annotations

import ssl
import threading
import time
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from schemas import (
    KINDS,
    ActivationBatch,
    DeviceStatus,
    Progress,
    WireError,
    WireTensor,
    decode,
    encode,
    new_msg_id,
    subscription,
    topic,
)
from schemas.limits import MAX_PAYLOAD_BYTES, MAX_TENSOR_ELEMENTS
from schemas.topics import DOWNLINK_KINDS, UPLINK_KINDS
from schemas.vectors import FINGERPRINT, example_messages
from sidetune.services import SERVER_USER, new_share_group

pytestmark = [pytest.mark.integration, pytest.mark.edge, pytest.mark.timeout(60)]

MAX_PACKET_SIZE = 17825792  # broker_config/sidetune.conf


class Peer:
    """Callbacks of one paho client turned into waitable results."""

    def __init__(self, client: mqtt.Client, on_message_delay: float = 0.0) -> None:
        self.client = client
        self.cond = threading.Condition()
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.disconnects: list[Any] = []
        self.delay = on_message_delay
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect

    def _on_publish(self, c: Any, ud: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self.cond:
            self.pubacks[mid] = rc
            self.cond.notify_all()

    def _on_subscribe(self, c: Any, ud: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        with self.cond:
            self.subacks[mid] = rcs
            self.cond.notify_all()

    def _on_message(self, c: Any, ud: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()
        if self.delay:
            time.sleep(self.delay)  # a slow consumer: paho acknowledges after the callback

    def _on_disconnect(self, c: Any, ud: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.cond:
            self.disconnects.append(rc)
            self.cond.notify_all()

    def _wait(self, predicate: Any, timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def subscribe(self, flt: str, timeout: float = 5.0) -> list[ReasonCode]:
        rc, mid = self.client.subscribe(flt, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        self._wait(lambda: mid in self.subacks, timeout, f"SUBACK for {flt}")
        return self.subacks[mid]

    def publish(self, t: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> ReasonCode:
        info = self.client.publish(t, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        self._wait(lambda: info.mid in self.pubacks, timeout, f"PUBACK for {t}")
        return self.pubacks[info.mid]

    def wait_messages(self, n: int, timeout: float = 10.0, topic_: str | None = None) -> list[mqtt.MQTTMessage]:
        def mine() -> list[mqtt.MQTTMessage]:
            return [m for m in self.messages if topic_ is None or m.topic == topic_]

        self._wait(lambda: len(mine()) >= n, timeout, f"{n} messages on {topic_ or 'any topic'}")
        return mine()


def ok(rc: ReasonCode) -> bool:
    # 0x10 "No matching subscribers" is a success code too
    return not rc.is_failure


def as_device(kind: str, device: str) -> Any:
    return example_messages()[kind].model_copy(update={"device_id": device, "msg_id": new_msg_id()})


# --------------------------------------------------------------------------- each kind, right account


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_travels_from_the_right_account(kind, mqtt_client, device_account):
    device, _ = device_account
    message = as_device(kind, device)
    t, payload = encode(message)
    dev = Peer(mqtt_client(device))
    srv = Peer(mqtt_client(SERVER_USER))
    if kind in UPLINK_KINDS:
        sender, receiver, flt = dev, srv, subscription(kind)  # the server reads every device's uplinks
    else:
        assert kind in DOWNLINK_KINDS
        sender, receiver, flt = srv, dev, subscription(kind, device)
    assert [rc.value for rc in receiver.subscribe(flt)] == [1]
    assert ok(sender.publish(t, payload))
    (msg,) = receiver.wait_messages(1, topic_=t)
    assert msg.qos == 1
    got = decode(msg.topic, msg.payload)
    assert got == message
    assert encode(got) == (t, payload)


def test_activation_batch_of_8_mib(mqtt_client, device_account):
    device, _ = device_account
    rng = np.random.default_rng(0)
    shape = (64, 32, 2048)  # 4 Mi fp16 values: 8 MiB, the largest tensor the contract allows
    assert np.prod(shape) == MAX_TENSOR_ELEMENTS
    states = WireTensor.from_array(rng.normal(size=shape).astype(np.float32), "float16")
    keys = tuple(f"{i:064x}" for i in range(shape[0]))
    message = ActivationBatch(device_id=device, job_id="job-big", backbone_fingerprint=FINGERPRINT, keys=keys,
                              states=states)
    t, payload = encode(message)
    assert 8 * 2**20 < len(payload) < 9 * 2**20
    srv = Peer(mqtt_client(SERVER_USER))
    srv.subscribe(subscription("activations", share_group=new_share_group()))
    dev = Peer(mqtt_client(device))
    assert ok(dev.publish(t, payload, timeout=30))
    (msg,) = srv.wait_messages(1, timeout=30, topic_=t)
    assert len(msg.payload) == len(payload)
    assert decode(msg.topic, msg.payload) == message


def test_payload_between_contract_and_broker_limit_is_left_to_the_contract(mqtt_client, device_account):
    """max_packet_size sits above MAX_PAYLOAD_BYTES: such a payload passes mosquitto and decode rejects it."""
    device, _ = device_account
    t = topic(device, "activations")
    payload = b"STW1" + bytes(MAX_PAYLOAD_BYTES - 3)
    assert MAX_PAYLOAD_BYTES < len(payload) < MAX_PACKET_SIZE - 1024
    srv = Peer(mqtt_client(SERVER_USER))
    srv.subscribe(subscription("activations", device))
    dev = Peer(mqtt_client(device))
    assert ok(dev.publish(t, payload, timeout=30))
    (msg,) = srv.wait_messages(1, timeout=30, topic_=t)
    with pytest.raises(WireError, match="over the 16777216 limit") as e:
        decode(msg.topic, msg.payload)
    assert e.value.code == "too_large"


def test_payload_above_max_packet_size_is_refused_by_the_broker(mqtt_client, device_account, mosquitto):
    device, _ = device_account
    t = topic(device, "activations")
    srv = Peer(mqtt_client(SERVER_USER))
    srv.subscribe(subscription("activations", device))
    client = mqtt_client(device)
    client.reconnect_delay_set(min_delay=60, max_delay=120)  # no automatic resend of the oversize packet
    dev = Peer(client)
    log_before = mosquitto.log.read_text(errors="replace")
    info = client.publish(t, bytes(MAX_PACKET_SIZE + 1024), qos=1)
    assert info.rc == mqtt.MQTT_ERR_SUCCESS  # paho sends it; the broker is the one that refuses
    dev._wait(lambda: dev.disconnects, 20, "the broker to drop the oversize publisher")
    client.loop_stop()
    assert info.mid not in dev.pubacks, "an oversize publish was acknowledged"
    # the server's session is unaffected and never sees it: a normal message after it arrives alone
    dev2 = Peer(mqtt_client(device))
    t2, p2 = encode(as_device("activations", device))
    assert ok(dev2.publish(t2, p2))
    msgs = srv.wait_messages(1, topic_=t)
    assert [m.payload for m in msgs] == [p2]
    time.sleep(0.2)
    new_log = mosquitto.log.read_text(errors="replace")[len(log_before):]
    assert "disconnected due to oversize packet" in new_log, new_log[-2000:]


def test_connack_announces_the_maximum_packet_size(mosquitto, broker_accounts):
    from paho.mqtt.enums import CallbackAPIVersion

    got: dict[str, Any] = {}
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{new_msg_id()[:8]}", protocol=mqtt.MQTTv5)
    c.username_pw_set(SERVER_USER, broker_accounts[SERVER_USER])

    def on_connect(cl: Any, ud: Any, flags: Any, rc: Any, props: Any) -> None:
        got["props"] = props
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    try:
        assert done.wait(10)
        assert got["props"].MaximumPacketSize == MAX_PACKET_SIZE
        assert MAX_PACKET_SIZE > MAX_PAYLOAD_BYTES
    finally:
        c.disconnect()
        c.loop_stop()


# --------------------------------------------------------------------------- ACLs as shipped


def test_device_cannot_publish_to_another_devices_topic(mqtt_client, device_account, broker_accounts):
    device, _ = device_account
    victim = "dev-b" if device != "dev-b" else "dev-c"
    srv = Peer(mqtt_client(SERVER_USER))
    srv.subscribe(subscription("jobs"))
    watcher = Peer(mqtt_client(victim))
    watcher.subscribe(topic(victim, "adapter"))
    attacker = Peer(mqtt_client(device))
    forged = as_device("jobs", victim)
    t, p = encode(forged)
    rc = attacker.publish(t, p)
    assert rc.is_failure and rc.getName() == "Not authorized"
    # a downlink forged by a device is refused as well
    attacker2 = Peer(mqtt_client(device))
    t_ad, p_ad = encode(as_device("adapter", victim))
    assert attacker2.publish(t_ad, p_ad).getName() == "Not authorized"
    # the PUBACKs came after routing; a legitimate message published now arrives alone
    t_ok, p_ok = encode(as_device("jobs", victim))
    assert ok(Peer(mqtt_client(victim)).publish(t_ok, p_ok))
    t_ad2, p_ad2 = encode(as_device("adapter", victim))
    assert ok(Peer(mqtt_client(SERVER_USER)).publish(t_ad2, p_ad2))
    assert [m.payload for m in srv.wait_messages(1, topic_=t)] == [p_ok]
    assert [m.payload for m in watcher.wait_messages(1)] == [p_ad2]


def test_device_cannot_read_another_devices_downlinks(mqtt_client, device_account):
    device, _ = device_account
    victim = "dev-c" if device != "dev-c" else "dev-d"
    spy = Peer(mqtt_client(device))
    for kind in DOWNLINK_KINDS:
        spy.subscribe(topic(victim, kind))  # granted: mosquitto checks the ACL on delivery
    spy.subscribe("sidetune/v1/+/progress")
    spy.subscribe("sidetune/v1/#")
    spy.subscribe(topic(device, "progress"))
    owner = Peer(mqtt_client(victim))
    owner.subscribe(subscription("progress", victim))
    srv = Peer(mqtt_client(SERVER_USER))
    for kind in DOWNLINK_KINDS:
        t, p = encode(as_device(kind, victim))
        assert ok(srv.publish(t, p))
    # a sentinel to the spy's own topic, sent last: when it arrives, anything leaked would have too
    t_own, p_own = encode(as_device("progress", device))
    assert ok(srv.publish(t_own, p_own))
    spy.wait_messages(1, topic_=t_own)
    owner.wait_messages(1, topic_=topic(victim, "progress"))
    # (overlapping subscriptions each get their copy of the sentinel in mosquitto 2.0)
    assert {m.topic for m in spy.messages} == {t_own}


def test_device_cannot_read_other_devices_uplinks(mqtt_client, device_account):
    device, _ = device_account
    other = "dev-e" if device != "dev-e" else "dev-f"
    spy = Peer(mqtt_client(device))
    spy.subscribe(subscription("jobs"))
    spy.subscribe(topic(other, "status"))
    spy.subscribe(topic(device, "status"))
    spy.subscribe(topic(device, "progress"))
    for kind in ("jobs", "status"):
        t, p = encode(as_device(kind, other))
        assert ok(Peer(mqtt_client(other)).publish(t, p))
    t_st, p_st = encode(as_device("status", device))
    assert ok(spy.publish(t_st, p_st))  # its own status: written, never read back (write-only)
    # a sentinel on its own downlink, sent last: when it arrives, anything leaked would have too
    t_own, p_own = encode(as_device("progress", device))
    assert ok(Peer(mqtt_client(SERVER_USER)).publish(t_own, p_own))
    spy.wait_messages(1, topic_=t_own)
    assert {m.topic for m in spy.messages} == {t_own}


def test_server_reads_all_uplinks_through_a_shared_subscription(mqtt_client):
    workers = [Peer(mqtt_client(SERVER_USER)), Peer(mqtt_client(SERVER_USER))]
    group = new_share_group()  # a secret, as `sidetune broker init` writes it (tests/test_hostile_broker.py)
    flt = subscription("jobs", share_group=group)
    assert flt == f"$share/{group}/sidetune/v1/+/jobs"
    for w in workers:
        assert [rc.value for rc in w.subscribe(flt)] == [1]
    sent = {}
    for i in range(24):
        device = ("dev-a", "dev-b", "dev-c")[i % 3]
        m = as_device("jobs", device)
        sent[m.msg_id] = m
    pubs = {d: Peer(mqtt_client(d)) for d in ("dev-a", "dev-b", "dev-c")}
    for m in sent.values():
        t, p = encode(m)
        assert ok(pubs[m.device_id].publish(t, p))
    deadline = time.monotonic() + 10
    while sum(len(w.messages) for w in workers) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    got = [decode(m.topic, m.payload) for w in workers for m in w.messages]
    assert sorted(g.msg_id for g in got) == sorted(sent)  # each exactly once
    for g in got:
        assert g == sent[g.msg_id]
    counts = [len(w.messages) for w in workers]
    assert all(c > 0 for c in counts), f"the share group did not split the messages: {counts}"


def test_server_cannot_publish_uplinks(mqtt_client, device_account):
    """The server account writes downlinks only: it cannot forge a device's job."""
    device, _ = device_account
    t, p = encode(as_device("jobs", device))
    assert Peer(mqtt_client(SERVER_USER)).publish(t, p).getName() == "Not authorized"


@pytest.mark.parametrize("user,password", [
    ("dev-a", "wrong"),
    ("dev-a", ""),
    ("no-such-device", "x"),
    (SERVER_USER, "wrong"),
])
def test_wrong_credentials_are_refused(mqtt_client, user, password):
    with pytest.raises(ConnectionRefusedError) as e:
        mqtt_client(user, password)
    assert e.value.reason_code.getName() in {"Not authorized", "Bad user name or password"}


def test_device_password_does_not_open_another_account(mqtt_client, broker_accounts):
    with pytest.raises(ConnectionRefusedError):
        mqtt_client("dev-b", broker_accounts["dev-a"])
    with pytest.raises(ConnectionRefusedError):
        mqtt_client(SERVER_USER, broker_accounts["dev-a"])


def test_anonymous_is_refused(mqtt_client):
    with pytest.raises(ConnectionRefusedError) as e:
        mqtt_client(None)
    assert e.value.reason_code.getName() in {"Not authorized", "Bad user name or password"}


# --------------------------------------------------------------------------- TLS


def test_tls_listener_with_the_test_ca(mqtt_client, device_account, mosquitto):
    assert mosquitto.tls and mosquitto.tls_port and mosquitto.ca_file.exists()
    device, _ = device_account
    dev = Peer(mqtt_client(device, tls=True))
    srv = Peer(mqtt_client(SERVER_USER, tls=True))
    dev.subscribe(subscription("progress", device))
    t, p = encode(as_device("progress", device))
    assert ok(srv.publish(t, p))
    (msg,) = dev.wait_messages(1, topic_=t)
    assert decode(msg.topic, msg.payload) == decode(t, p)
    assert isinstance(dev.client.socket(), ssl.SSLSocket)


def test_tls_certificate_verifies_only_with_the_test_ca(mosquitto):
    import socket

    trusted = ssl.create_default_context(cafile=str(mosquitto.ca_file))
    with socket.create_connection(("127.0.0.1", mosquitto.tls_port), timeout=5) as raw:
        with trusted.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in {"TLSv1.2", "TLSv1.3"}
            assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]
    system = ssl.create_default_context()  # the system's CAs: the test CA is not among them
    with socket.create_connection(("127.0.0.1", mosquitto.tls_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            system.wrap_socket(raw, server_hostname="127.0.0.1")


def test_tls_listener_requires_credentials_too(mqtt_client):
    with pytest.raises(ConnectionRefusedError):
        mqtt_client("dev-a", "wrong", tls=True)


# --------------------------------------------------------------------------- retained, persistence, last will


def test_retained_adapter_survives_a_restart(mqtt_client, device_account, mosquitto):
    device, _ = device_account
    message = as_device("adapter", device)
    t, p = encode(message)
    srv = Peer(mqtt_client(SERVER_USER))
    assert ok(srv.publish(t, p, retain=True))
    srv.client.disconnect()
    try:
        mosquitto.restart()
        dev = Peer(mqtt_client(device))
        dev.subscribe(subscription("adapter", device))
        (msg,) = dev.wait_messages(1, topic_=t)
        assert msg.retain
        assert decode(msg.topic, msg.payload) == message
    finally:  # clear the retained message: the device account is reused by later tests
        Peer(mqtt_client(SERVER_USER)).publish(t, b"", retain=True)


def test_retained_status_and_last_will(mqtt_client, device_account, mosquitto, broker_accounts):
    from paho.mqtt.enums import CallbackAPIVersion

    device, password = device_account
    t = topic(device, "status")
    offline = DeviceStatus(device_id=device, state="offline", agent_version="0.1.0")
    online = DeviceStatus(device_id=device, state="online", agent_version="0.1.0", adapter_version=2)
    board = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{device}-will", protocol=mqtt.MQTTv5)
    board.username_pw_set(device, password)
    board.will_set(t, encode(offline)[1], qos=1, retain=True)
    connected = threading.Event()
    board.on_connect = lambda *a: connected.set()
    board.connect("127.0.0.1", mosquitto.port)
    board.loop_start()
    try:
        assert connected.wait(10)
        b = Peer(board)
        assert ok(b.publish(t, encode(online)[1], retain=True))
        srv = Peer(mqtt_client(SERVER_USER))
        srv.subscribe(subscription("status"))
        (first,) = srv.wait_messages(1, topic_=t)
        assert first.retain and decode(t, first.payload) == online
        # "disconnect with will message" (v5 reason 0x04): the broker publishes the will
        board.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        msgs = srv.wait_messages(2, topic_=t)
        assert decode(t, msgs[1].payload) == offline
        late = Peer(mqtt_client(SERVER_USER))
        late.subscribe(subscription("status", device))
        (kept,) = late.wait_messages(1, topic_=t)
        assert kept.retain and decode(t, kept.payload) == offline
    finally:
        board.loop_stop()
        Peer(mqtt_client(device)).publish(t, b"", retain=True)


# --------------------------------------------------------------------------- queueing


def test_slow_subscriber_gets_all_2000_messages(mqtt_client, device_account, mosquitto):
    """With mosquitto's default max_queued_messages (1000) about 1,100 of these arrive; as shipped, all."""
    device, _ = device_account
    n = 2000
    t = topic(device, "progress")
    sub = Peer(mqtt_client(device), on_message_delay=0.001)
    sub.subscribe(t)
    srv = Peer(mqtt_client(SERVER_USER))
    ids = []
    payloads = []
    for i in range(n):
        m = Progress(device_id=device, job_id="job-q", state="training", epoch=i % 1000, msg_id=new_msg_id())
        ids.append(m.msg_id)
        payloads.append(encode(m)[1])
    log_before = len(mosquitto.log.read_text(errors="replace"))
    infos = [srv.client.publish(t, p, qos=1) for p in payloads]
    srv._wait(lambda: all(i.mid in srv.pubacks for i in infos), 20, "all PUBACKs")
    backlog = n - len(sub.messages)
    assert backlog > 1000, f"the subscriber kept up (backlog {backlog}): the test does not exercise the queue limit"
    msgs = sub.wait_messages(n, timeout=25)
    got = [decode(m.topic, m.payload).msg_id for m in msgs]
    assert got == ids  # all, once each, in order (within the waits' time limits)
    assert "dropped" not in mosquitto.log.read_text(errors="replace")[log_before:]
