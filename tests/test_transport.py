"""schemas.transport against a real mosquitto: acknowledgements tracked from PUBACKs,
publishes made while the broker is down, and the receive window that bounds what a
manual-ack subscriber can be handed."""

from __future__ import annotations

import threading
import time

import pytest

from schemas.transport import BrokerAddress, Incoming, Transport
from sidetune.services import SERVER_USER, Mosquitto, free_port
from tests.loop_helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.edge, pytest.mark.timeout(90)]


def transport(port: int, user: str, password: str, on_message=lambda _m: None, **kw) -> Transport:
    return Transport(f"{user}-t-{time.monotonic_ns()}", BrokerAddress("127.0.0.1", port, user, password),
                     on_message, **kw)


def test_every_publication_is_acknowledged(mosquitto, device_account):
    device, password = device_account
    t = transport(mosquitto.port, device, password).start()
    try:
        pubs = [t.publish(f"sidetune/v1/{device}/jobs", b"x" * 100) for _ in range(200)]
        assert all(p.wait(10) for p in pubs)
        assert len({p.mid for p in pubs}) > 1 and not t._pending and not t._early
    finally:
        t.stop()


def test_publications_made_while_the_broker_is_down_are_acknowledged_once_it_is_up(tmp_path, broker_accounts,
                                                                                   device_account):
    device, password = device_account
    broker = Mosquitto(tmp_path / "late", {device: password}, port=free_port())
    t = transport(broker.port, device, password).start(wait=False)
    try:
        pubs = [t.publish(f"sidetune/v1/{device}/jobs", b"y") for _ in range(5)]
        time.sleep(0.5)
        assert not any(p.acknowledged() for p in pubs)
        broker.start()
        assert all(p.wait(20) for p in pubs)
    finally:
        t.stop()
        broker.stop()


def test_the_receive_window_bounds_unacknowledged_deliveries(mosquitto, broker_accounts, device_account):
    """The server's transport takes messages with manual acks; the broker hands it at most
    ``receive_maximum`` before it acknowledges any (MQTT v5 flow control)."""
    device, password = device_account
    got: list[Incoming] = []
    lock = threading.Lock()

    def keep(m: Incoming) -> None:
        with lock:
            got.append(m)

    server = transport(mosquitto.port, SERVER_USER, broker_accounts[SERVER_USER], keep, manual_ack=True,
                       receive_maximum=8, subscriptions=(f"sidetune/v1/{device}/jobs",))
    server.start()
    board = transport(mosquitto.port, device, password).start()
    try:
        pubs = [board.publish(f"sidetune/v1/{device}/jobs", str(i).encode()) for i in range(30)]
        assert all(p.wait(10) for p in pubs)
        wait_for(lambda: len(got) >= 8, 10, "the first window")
        time.sleep(1.0)
        assert len(got) == 8  # no more until some are acknowledged
        for m in list(got):
            server.ack(m.mid)
        wait_for(lambda: len(got) >= 16, 10, "the second window")
        for m in got[8:]:
            server.ack(m.mid)
        wait_for(lambda: len(got) >= 24, 10, "the third window")
        assert [int(m.payload) for m in got[:24]] == list(range(24))
    finally:
        board.stop()
        server.stop(end_session=True)
