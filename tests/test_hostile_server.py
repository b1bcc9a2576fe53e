"""Hostile devices against the server (issue 9, attack classes 1 and 2; class 6 is in test_fairness.py).

A real worker, Redis and mosquitto; the attacker is a separate MQTT client of its own valid device
account sending real encoded messages; a victim device's job runs at the same time and must end
with its adapter, with nothing of the victim's lost. The figures (victim's time to adapter alone
and under attack, Redis's memory) are printed and merged into figures.json (see test_fairness).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis

from schemas import AdapterUpdate, HyperParams, Rejection, SideNetSpec, encode
from side_server.cache import act_key
from side_server.config import Quotas
from side_server.store import JobStore
from sidetune.services import SERVER_USER
from tests.loop_helpers import make_batch, wait_for, worker_and_device
from tests.test_fairness import (  # noqa: F401 (second_device is a fixture)
    VICTIM_HYPER,
    VICTIM_SAMPLES,
    job_of,
    record,
    second_device,
    time_to_adapter,
    upload,
)

pytestmark = pytest.mark.integration

#: The victim's job: a board's round as the fairness test runs it (256 samples, 30 epochs; 2-3 s of
#: training here), so that the ratio measures the attacker, not timer noise on a sub-second job.
VICTIM = dict(n=VICTIM_SAMPLES, hyper=VICTIM_HYPER)
MiB = 2**20


def codes(rejections: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in rejections:
        reason = m.reason.split(" ", 1)[0]
        key = reason if reason.startswith(("quota_", "server_full")) else m.code
        out[key] = out.get(key, 0) + 1
    return out


def test_redis_exhaustion_stops_at_the_attackers_quotas(request, tmp_path, mosquitto, redis_url, broker_accounts,
                                                        mqtt_client, device_account, second_device):  # noqa: F811
    """Class 1: an attacker sends job after job of thousands of keys and uploads activations for them.
    Its quotas stop it; Redis stays under maxmemory, evicts nothing, and the victim's cached
    activations and job are intact."""
    quotas = Quotas(cache_bytes=8 * MiB, record_bytes=8 * MiB)
    r = redis.Redis.from_url(redis_url)
    limit = r.config_get("maxmemory")["maxmemory"]
    try:
        maxmemory = r.info("memory")["used_memory"] + 96 * MiB
        r.config_set("maxmemory", str(maxmemory))
        evicted = r.info("stats")["evicted_keys"]
        with worker_and_device(mosquitto, redis_url, broker_accounts, mqtt_client, device_account, "hostile-redis",
                               process=tmp_path, quotas=quotas) as (worker, victim):
            time_to_adapter(victim, job_of(victim.id, VICTIM["n"], VICTIM["hyper"]))  # warm-up (first training)
            first = job_of(victim.id, VICTIM["n"], VICTIM["hyper"])
            solo = time_to_adapter(victim, first)
            attacker = second_device("dev-e")
            wide = SideNetSpec(num_states=5, width=1024, taps=(2, 4), out_dim=4)  # 10 KiB per sample in fp16
            jobs = [job_of(attacker.id, 1000, HyperParams(epochs=1), wide) for _ in range(12)]
            peak = [0]

            # encoded beforehand: the attacker's CPU is its own board's, not this process's
            payloads = [encode(j) for j in jobs]
            payloads += [encode(make_batch(j, j.keys[i : i + 500], shape=(5, 1024))) for j in jobs[:4]
                         for i in range(0, 1000, 500)]

            def attack() -> None:
                for t, p in payloads:
                    attacker.publish(t, p)
                    peak[0] = max(peak[0], r.info("memory")["used_memory"])

            at = len(attacker.down)
            t = threading.Thread(target=attack)
            t.start()
            under_attack = time_to_adapter(victim, job_of(victim.id, VICTIM["n"], VICTIM["hyper"]))
            t.join(60)
            time.sleep(1.0)  # the last rejections arrive
            got = codes(attacker.down.since(at, Rejection))
            usage = JobStore(r).usage(attacker.id)
            used = r.info("memory")["used_memory"]
            assert got.get("quota_records", 0) + got.get("quota_jobs", 0) >= 1, got
            assert got.get("quota_cache", 0) >= 1, got
            assert usage["job_bytes"] <= quotas.record_bytes and usage["cache_bytes"] <= quotas.cache_bytes, usage
            assert max(peak[0], used) < maxmemory
            assert r.info("stats")["evicted_keys"] == evicted  # nothing of anyone's was evicted
            assert all(r.exists(act_key(victim.id, k)) for k in first.keys)  # the victim's cache is intact
    finally:
        r.config_set("maxmemory", limit)
        r.close()
    record(request, "redis exhaustion", {
        "victim_seconds_alone": round(solo, 3), "victim_seconds_with_attacker": round(under_attack, 3),
        "ratio": round(under_attack / solo, 2), "attacker_rejections": got, "attacker_usage": usage,
        "redis_used_memory_peak": max(peak[0], used), "redis_maxmemory": maxmemory})
    # The worker handles the attacker's 20 heavy messages (1,000-key jobs, 5 MB batches; 50-180 ms
    # each) between the victim's (the ingest is round robin by device): about a second in all.
    assert under_attack <= 2 * solo, (solo, under_attack)


GIANT = SideNetSpec(num_states=1024, width=16384, taps=tuple(range(0, 1024, 4)), bottleneck=1024, out_dim=256)


def test_giant_side_networks_are_refused_before_allocation(request, tmp_path, mosquitto, redis_url, broker_accounts,
                                                           mqtt_client, device_account, second_device):  # noqa: F811
    """Class 2: the largest spec the contract allows (~8.6 G parameters), one key and a batch for it."""
    with worker_and_device(mosquitto, redis_url, broker_accounts, mqtt_client, device_account,
                           "hostile-giant", process=tmp_path) as (worker, victim):
        time_to_adapter(victim, job_of(victim.id, VICTIM["n"], VICTIM["hyper"]))  # warm-up (first training)
        solo = time_to_adapter(victim, job_of(victim.id, VICTIM["n"], VICTIM["hyper"]))
        attacker = second_device("dev-e")
        rss = worker.rss_bytes()
        at = len(attacker.down)
        giants = [job_of(attacker.id, 1, HyperParams(epochs=1000, batch_size=1), GIANT) for _ in range(5)]

        def attack() -> None:
            for j in giants:
                attacker.send(j)
                attacker.publish(*encode(make_batch(j, j.keys, shape=(GIANT.num_states, 1024))))

        t = threading.Thread(target=attack)
        t.start()
        under_attack = time_to_adapter(victim, job_of(victim.id, VICTIM["n"], VICTIM["hyper"]))
        t.join(30)
        wait_for(lambda: len(attacker.down.since(at, Rejection)) >= 10, 10, "ten rejections")
        got = codes(attacker.down.since(at, Rejection))
        grown = worker.rss_bytes() - rss
        assert got == {"quota_sidenet": 5, "unknown_job": 5}, got
        assert grown < 64 * MiB, grown
    record(request, "giant side networks", {
        "victim_seconds_alone": round(solo, 3), "victim_seconds_with_attacker": round(under_attack, 3),
        "ratio": round(under_attack / solo, 2), "attacker_rejections": got, "worker_rss_growth_mib": round(grown / MiB, 1)})
    assert under_attack <= 2 * solo, (solo, under_attack)
    assert not any(isinstance(m, AdapterUpdate) for m in attacker.down.messages)


def test_a_retained_job_is_never_replayed_to_a_worker(mosquitto, redis_url, broker_accounts, mqtt_client,
                                                      device_account):
    """mosquitto cannot refuse a device's retained uplink; the worker subscribes to jobs and
    activations with Retain Handling 2, so a job left retained is not trained on every restart."""
    from tests.loop_helpers import Downlinks, make_job, server_settings, start_worker

    device, password = device_account
    board = mqtt_client(device, password)
    down = Downlinks(board, device)
    job = make_job(device)
    t, payload = encode(job)
    board.publish(t, payload, qos=1, retain=True).wait_for_publish(5)
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER],
                                          worker_id=f"ret-{os.getpid()}", share_group=f"ret-{time.monotonic_ns()}"))
    try:
        time.sleep(2.0)
        assert not JobStore(redis.Redis.from_url(redis_url)).get(device, job.job_id)
        assert not [m for m in down.messages if getattr(m, "job_id", None) == job.job_id
                    or getattr(m, "ref_msg_id", None) == job.msg_id]  # neither answered nor rejected
        live = make_job(device)  # the same device's live job is served as usual
        board.publish(*encode(live), qos=1).wait_for_publish(5)
        wait_for(lambda: JobStore(redis.Redis.from_url(redis_url)).get(device, live.job_id), 10, "the live job")
    finally:
        worker.stop()
        board.publish(t, b"", qos=1, retain=True).wait_for_publish(5)


def test_a_resumed_session_leaves_the_old_guessable_group(mosquitto, redis_url, broker_accounts, mqtt_client,
                                                          device_account):
    """A worker killed under the old configuration (share group "workers") left a persistent session
    subscribed there; restarted with a secret group, it unsubscribes the old one, so it gets each
    uplink once and nobody can join the old group to take a share."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from tests.loop_helpers import Downlinks, make_job, server_settings, start_worker

    device, password = device_account
    wid = f"legacy-{time.monotonic_ns()}"
    old = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sidetune-server-{wid}", protocol=mqtt.MQTTv5)
    old.username_pw_set(SERVER_USER, broker_accounts[SERVER_USER])
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    old.connect("127.0.0.1", mosquitto.port, clean_start=False, properties=props)
    old.loop_start()
    wait_for(lambda: old.is_connected(), 10, "the old session")
    old.subscribe("$share/workers/sidetune/v1/+/jobs", qos=1)  # as every worker did
    time.sleep(0.5)
    old.disconnect()  # the session (and its subscription) stays, as after a SIGKILL
    old.loop_stop()
    board = mqtt_client(device, password)
    down = Downlinks(board, device)
    worker = start_worker(server_settings(mosquitto, redis_url, broker_accounts[SERVER_USER], worker_id=wid,
                                          share_group=f"secret-{wid}"))
    try:
        time.sleep(1.0)
        job = make_job(device)
        board.publish(*encode(job), qos=1).wait_for_publish(5)
        wait_for(lambda: any(getattr(m, "job_id", None) == job.job_id for m in down.messages), 10, "the answer")
        time.sleep(1.5)
        answers = [m for m in down.messages if getattr(m, "job_id", None) == job.job_id]
        assert len(answers) == 1, answers  # one copy: the old group's subscription is gone
    finally:
        worker.stop()
