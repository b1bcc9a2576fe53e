"""A Redis outage in the worker's journal (issue 23): one line when it starts, one when it ends with
its length, per loop, not a line a second (about 50 lines in 25 s per worker before)."""

from __future__ import annotations

import logging
import re
import time
import uuid

import pytest

from schemas import encode
from schemas.vectors import example_messages
from sidetune.services import SERVER_USER
from tests.conftest import VECTOR_DEVICE
from tests.loop_helpers import server_settings, start_worker, wait_for

pytestmark = pytest.mark.integration

OUTAGE_S = 8.0


def test_a_redis_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    mosquitto, redis_server, redis_url, broker_accounts, mqtt_client, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidetune.server")
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER],
                                          worker_id=f"outage-{uuid.uuid4().hex[:6]}",
                                          share_group=f"outage-{uuid.uuid4().hex[:8]}"))
    board = mqtt_client(VECTOR_DEVICE, broker_accounts[VECTOR_DEVICE])
    try:
        time.sleep(1.0)  # the worker subscribed and its loops ran against a live Redis
        redis_server.stop()
        stopped = time.monotonic()
        time.sleep(1.0)
        status_topic, payload = encode(example_messages()["status"])
        board.publish(status_topic, payload, qos=1).wait_for_publish(10)  # the ingest loop retries it
        time.sleep(OUTAGE_S - (time.monotonic() - stopped))
        redis_server.start()

        def back(where: str) -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith(f"redis back in the {where} after")]

        wait_for(lambda: back("training loop") and back("ingest loop"), 20, "both loops to see Redis back")
    finally:
        worker.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for where in ("training loop", "ingest loop"):
        went = [m for m in warnings if m.startswith(f"redis unavailable in the {where}")]
        came = [m for m in warnings if m.startswith(f"redis back in the {where}")]
        assert len(went) == 1 and len(came) == 1, warnings
        seconds = float(re.search(r"after ([\d.]+) s", came[0]).group(1))  # type: ignore[union-attr]
        assert 0.5 < seconds < OUTAGE_S + 6, came
    # backed off: at most every 5 s after the first few, so a handful of tries, not one a second
    tries = [r for r in caplog.records if r.getMessage().startswith("redis still unavailable in the training")]
    assert len(tries) <= 6, len(tries)
    assert not any("retrying" in m and "at most" not in m for m in warnings), warnings
