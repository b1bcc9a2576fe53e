"""The one wrapper around paho-mqtt, used by the board and the server alike: no other
module talks to paho.

paho 2.x still defaults to the old callback API and MQTT 3.1.1; this wraps it
once with VERSION2 callbacks, MQTT v5, QoS 1, persistent sessions and
re-subscription on every reconnect. Incoming messages go to ``on_message``
(called on paho's thread: it must not block). With ``manual_ack`` the caller
acknowledges a message only once it is safely stored, so a crash makes the
broker deliver it again instead of losing it.

Bounds. The broker may have at most ``receive_maximum`` QoS 1 messages
unacknowledged towards us (MQTT v5 flow control, sent in CONNECT): with
``manual_ack`` that bounds whatever the caller queues between receipt and
acknowledgement. Outgoing, paho keeps at most 32 messages in flight; a
:class:`Publication` says when the broker acknowledged one (tracked here from
PUBACKs, never from paho's private fields).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from schemas.errors import ConfigurationError, UnavailableError

log = logging.getLogger(__name__)

QOS = 1

#: CONNACK reasons that retrying cannot fix: the credentials or the client id are wrong.
_FATAL_REASONS = frozenset({"Bad user name or password", "Not authorized", "Client identifier not valid",
                            "Banned", "Bad authentication method"})


class TransportError(UnavailableError):
    """The broker could not be reached (it may be later)."""


class TransportRefused(ConfigurationError, TransportError):
    """The broker refused our credentials, or its certificate does not verify: a retry will not help."""


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    mid: int
    retain: bool
    duplicate: bool


class Publication:
    """One QoS 1 publish: :meth:`acknowledged` once the broker's PUBACK came (after a
    reconnect too: paho resends it with the same message id)."""

    __slots__ = ("mid", "_acked")

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._acked = threading.Event()

    def acknowledged(self) -> bool:
        return self._acked.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._acked.wait(timeout)


@dataclass(frozen=True)
class BrokerAddress:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # TLS when set

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise TransportError(f"bad broker port {self.port}")


class Transport:
    def __init__(
        self,
        client_id: str,
        broker: BrokerAddress,
        on_message: Callable[[Incoming], None],
        *,
        subscriptions: tuple[str, ...] = (),
        will: tuple[str, bytes] | None = None,
        manual_ack: bool = False,
        session_expiry: int = 7 * 24 * 3600,
        on_connected: Callable[[bool], None] | None = None,
        receive_maximum: int = 64,
        no_retained: tuple[str, ...] = (),
        drop_subscriptions: tuple[str, ...] = (),
    ) -> None:
        self.broker = broker
        self.subscriptions = subscriptions
        #: Filters subscribed with Retain Handling 2: the broker sends no retained message on
        #: subscribing (a device can leave one on each topic it writes; DESIGN.md §8).
        self.no_retained = frozenset(no_retained)
        #: Filters a resumed session may still hold from an older configuration: dropped on connect.
        self.drop_subscriptions = drop_subscriptions
        self.connected = threading.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._on_message = on_message
        self._pending: dict[int, Publication] = {}  # mid -> publication awaiting its PUBACK
        self._early: set[int] = set()  # PUBACKs that beat the registration of their publish
        self._receive_maximum = receive_maximum
        self._on_connected = on_connected  # (first connection?) on paho's thread: must not block
        self._connections = 0
        self._refused: str | None = None
        #: Set (with the reason) once the broker refused the credentials or the certificate failed.
        self.fatal: TransportRefused | None = None
        self._lock = threading.Lock()
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack
        )
        if broker.username is not None:
            c.username_pw_set(broker.username, broker.password)
        if broker.ca_file:
            try:
                c.tls_set(ca_certs=broker.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise TransportRefused(f"cannot use CA file {broker.ca_file}: {e}") from None
        if will is not None:
            c.will_set(will[0], will[1], qos=QOS, retain=True)
        c.max_inflight_messages_set(32)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=10)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_publish = self._handle_publish
        self._session_expiry = session_expiry
        self.client = c

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 15.0, *, wait: bool = True) -> Transport:
        """Connect and start paho's network thread.

        The first attempt is made here, so that a certificate that does not verify
        is a :class:`TransportRefused` at once (paho's own retries would hide it).
        With ``wait`` the call returns once the broker accepted us and raises
        otherwise; without it a broker that is down is not an error: paho keeps
        retrying in the background (watch :attr:`connected` and :attr:`fatal`).
        """
        where = f"{self.broker.host}:{self.broker.port}"
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        props.ReceiveMaximum = self._receive_maximum
        try:
            self.client.connect_async(self.broker.host, self.broker.port, keepalive=30, clean_start=False, properties=props)
            self.client.reconnect()
        except ssl.SSLCertVerificationError as e:
            raise TransportRefused(f"the certificate of broker {where} does not verify with CA "
                                   f"{self.broker.ca_file}: {e.verify_message or e}") from None
        except ssl.SSLError as e:
            raise TransportRefused(f"TLS with broker {where} failed ({e.reason or e}): "
                                   "is that port the broker's TLS listener?") from None
        except ValueError as e:  # paho: invalid host or port
            raise TransportRefused(f"bad broker address {where}: {e}") from None
        except OSError as e:
            if wait:
                raise TransportError(f"cannot reach broker {where}: {e.strerror or e}") from None
            log.warning("broker %s unreachable (%s); retrying in the background", where, e.strerror or e)
        self.client.loop_start()
        if not wait:
            return self
        deadline = time.monotonic() + timeout
        while not self.connected.wait(0.1):
            if self.fatal is not None or time.monotonic() > deadline:
                self.client.loop_stop()
                if self.fatal is not None:
                    raise self.fatal
                raise TransportError(f"could not connect to broker {where} ({self._refused or 'no answer'})")
        return self

    def stop(self, *, end_session: bool = False) -> None:
        """Disconnect; ``end_session`` also drops the broker-side session at once.

        A stopped server worker ends its session so that the broker stops
        routing shared-subscription messages to it; a board keeps its session
        so that downlinks wait for it.
        """
        props = None
        if end_session:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        try:
            self.client.disconnect(properties=props)
        finally:
            self.client.loop_stop()
            # paho keeps its wake-up socket pair until the client is collected; close it now.
            reset = getattr(self.client, "_reset_sockets", None)
            if reset is not None:
                reset()

    # ------------------------------------------------------------ operations

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Publication:
        """Queue a QoS 1 publish. Without a connection paho keeps it and sends it on reconnect
        (in this process only: what must survive a restart goes through the board's outbox)."""
        info = self.client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        pub = Publication(info.mid)
        # Not under a lock across client.publish: paho calls on_publish holding its own
        # out-message lock, which client.publish takes too.
        with self._lock:
            self.bytes_sent += len(payload)
            if info.mid in self._early:
                self._early.discard(info.mid)
                pub._acked.set()
            else:
                self._pending[info.mid] = pub
        return pub

    def ack(self, mid: int) -> None:
        self.client.ack(mid, QOS)

    # ------------------------------------------------------------ paho callbacks

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            log.error("broker refused the connection: %s", reason)
            if self._refused in _FATAL_REASONS:
                self.fatal = TransportRefused(f"broker {self.broker.host}:{self.broker.port} refused "
                                              f"{self.broker.username or 'anonymous'}: {reason}")
            return
        if self.drop_subscriptions:
            client.unsubscribe(list(self.drop_subscriptions))
        for flt in self.subscriptions:
            retain_handling = 2 if flt in self.no_retained else 0
            client.subscribe(flt, options=SubscribeOptions(qos=QOS, retainHandling=retain_handling))
        self._connections += 1
        self.connected.set()
        if self._on_connected is not None:
            try:
                self._on_connected(self._connections == 1)
            except Exception:
                log.exception("connect handler failed")

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if reason.is_failure:
            log.warning("disconnected from broker: %s (reconnecting)", reason)

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.bytes_received += len(msg.payload)
        try:
            self._on_message(Incoming(msg.topic, bytes(msg.payload), msg.mid, bool(msg.retain), bool(msg.dup)))
        except Exception:  # a handler bug must not kill paho's network thread
            log.exception("message handler failed on %s", msg.topic)

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            pub = self._pending.pop(mid, None)
            if pub is None:
                self._early.add(mid)
        if pub is not None:
            pub._acked.set()
