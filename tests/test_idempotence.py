"""Every handler is idempotent (DESIGN §3): a message that arrives twice changes nothing.

Jobs and activation batches are built directly from the schemas (random data
of the right shapes), published by a raw paho client logged in as the device,
and handled by a real worker on a real Redis; the test reads the Redis state
before and after each duplicate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from schemas import (
    AdapterUpdate,
    CacheReport,
    Job,
    Message,
    Progress,
    Rejection,
    encode,
    new_msg_id,
    topic,
)
from side_server.store import key
from side_server.worker import Worker
from tests.loop_helpers import Device, make_batch, make_job, worker_and_device

pytestmark = pytest.mark.integration

N = 12


def fresh_envelope(msg: Message) -> bytes:
    """The same message as a resend by another client would carry it: new msg id and time."""
    return encode(msg.model_copy(update={"msg_id": new_msg_id(), "sent_at": time.time()}))[1]


def job_state(r: redis.Redis, device: str) -> dict[str, object]:
    """Everything the store keeps about a device's jobs (not its cache, nor its message rate bucket
    and when it was last heard from)."""
    out: dict[str, object] = {}
    for name_b in sorted(r.scan_iter(match=f"st:*{device}*")):
        name = name_b.decode()
        if name.startswith(("st:act:", "st:rate:", "st:seen:")):
            continue
        kind = r.type(name_b).decode()
        out[name] = {"hash": r.hgetall, "set": r.smembers, "string": r.get, "zset": lambda k: r.zrange(k, 0, -1)}[kind](name_b)
    out["st:ready"] = r.zrange("st:ready", 0, -1)
    return out


def cached(r: redis.Redis, device: str, keys: tuple[str, ...]) -> list[bytes | None]:
    return r.mget([key("act", device, k) for k in keys])


@pytest.fixture
def env(mosquitto, redis_url, broker_accounts, mqtt_client, device_account) -> Iterator[tuple[Worker, Device, redis.Redis]]:
    with worker_and_device(mosquitto, redis_url, broker_accounts, mqtt_client, device_account, "idem",
                           lease_seconds=3.0) as (worker, dev):
        r = redis.Redis.from_url(redis_url)
        try:
            yield worker, dev, r
        finally:
            r.close()


def train_to_done(dev: Device, job: Job, batches: list[bytes]) -> AdapterUpdate:
    start = len(dev.down)
    for b in batches:
        dev.publish(topic(dev.id, "activations"), b)
    done = dev.down.wait(lambda m: isinstance(m, Progress) and m.job_id == job.job_id and m.state == "done", 20,
                         f"job {job.job_id} done", start)
    assert isinstance(done, Progress)
    upd = dev.down.wait(lambda m: isinstance(m, AdapterUpdate) and m.job_id == job.job_id, 5, "the adapter", start)
    assert isinstance(upd, AdapterUpdate)
    return upd


# --------------------------------------------------------------------------- tests


def test_a_job_published_twice_is_answered_each_time_and_stored_once(env):
    worker, dev, r = env
    job = make_job(dev.id, N)
    _, payload = encode(job)
    jobs_before = len(list(r.scan_iter(match="st:job:*")))  # the fixture's probe jobs

    first = dev.cache_report(payload, job)
    assert first.total == N and set(first.missing) == set(job.keys)
    state = job_state(r, dev.id)
    assert len(list(r.scan_iter(match="st:job:*"))) == jobs_before + 1
    assert set(state[key("need", dev.id, job.job_id)]) == {k.encode() for k in job.keys}

    again = dev.cache_report(payload, job)  # the very same bytes (a QoS 1 redelivery)
    assert (again.total, set(again.missing)) == (first.total, set(first.missing))
    assert job_state(r, dev.id) == state

    resent = dev.cache_report(fresh_envelope(job), job)  # the board's resend: same job, new envelope
    assert (resent.total, set(resent.missing)) == (first.total, set(first.missing))
    assert job_state(r, dev.id) == state

    # half uploaded, then the job once more: only the other half is asked for, nothing else moves
    dev.progress(encode(make_batch(job, job.keys[:6]))[1], job)
    state = job_state(r, dev.id)
    assert set(state[key("need", dev.id, job.job_id)]) == {k.encode() for k in job.keys[6:]}
    for p in (payload, fresh_envelope(job)):
        rep = dev.cache_report(p, job)
        assert (rep.total, set(rep.missing)) == (N, set(job.keys[6:]))
        assert job_state(r, dev.id) == state
    assert len(list(r.scan_iter(match="st:job:*"))) == jobs_before + 1
    assert not dev.down.since(0, Rejection)


def test_an_activation_batch_delivered_twice_changes_nothing_and_the_job_trains_once(env):
    worker, dev, r = env
    job = make_job(dev.id, N)
    dev.cache_report(encode(job)[1], job)
    first_half = encode(make_batch(job, job.keys[:6]))[1]

    p1 = dev.progress(first_half, job)
    assert (p1.state, p1.samples_cached, p1.samples_total) == ("waiting", 6, N)
    content, state = cached(r, dev.id, job.keys), job_state(r, dev.id)
    assert all(c is not None for c in content[:6]) and all(c is None for c in content[6:])

    p2 = dev.progress(first_half, job)
    assert (p2.state, p2.samples_cached) == ("waiting", 6)
    assert cached(r, dev.id, job.keys) == content
    assert job_state(r, dev.id) == state

    start = len(dev.down)
    second_half = encode(make_batch(job, job.keys[6:]))[1]
    upd = train_to_done(dev, job, [second_half, second_half])
    dev.publish(topic(dev.id, "activations"), second_half)  # and once more after the job is done
    time.sleep(1.5)  # time for a second training run, if the duplicates caused one
    updates = dev.down.since(start, AdapterUpdate)
    assert [u.version for u in updates] == [1], updates
    assert upd.version == 1 and worker.stats.jobs_trained == 1
    assert len([m for m in dev.down.since(start, Progress) if m.state == "done"]) == 1
    assert r.get(key("adapter_ver", dev.id)) == b"1"
    assert r.hget(key("job", dev.id, job.job_id), "version") == b"1"
    assert not dev.down.since(0, Rejection)


def test_replaying_a_finished_job_publishes_no_new_adapter(env):
    worker, dev, r = env
    job = make_job(dev.id, N)
    job_payload = encode(job)[1]
    dev.cache_report(job_payload, job)
    batches = [encode(make_batch(job, job.keys[i : i + 4]))[1] for i in range(0, N, 4)]
    first = train_to_done(dev, job, batches)
    assert first.version == 1
    content = cached(r, dev.id, job.keys)
    state = job_state(r, dev.id)

    for replay in ([job_payload, *batches], [fresh_envelope(job), *batches]):
        start = len(dev.down)
        dev.publish(topic(dev.id, "jobs"), replay[0])
        for b in replay[1:]:
            dev.publish(topic(dev.id, "activations"), b)
        done = dev.down.wait(lambda m: isinstance(m, Progress) and m.job_id == job.job_id, 10,
                             "the answer to the replayed job", start)
        assert isinstance(done, Progress) and done.state == "done", done
        assert done.detail == "adapter version 1 published"
        time.sleep(1.0)  # time for a retraining, if the replay caused one
        assert not dev.down.since(start, AdapterUpdate)
        assert not dev.down.since(start, CacheReport)
        assert not dev.down.since(start, Rejection)
    assert worker.stats.jobs_trained == 1
    assert r.get(key("adapter_ver", dev.id)) == b"1"
    assert cached(r, dev.id, job.keys) == content
    assert job_state(r, dev.id) == state


def test_a_resent_job_whose_samples_were_cached_by_a_dead_worker_trains(env):
    """A worker that stored a batch and died before counting it leaves the job waiting with
    everything cached: the board's resend of the job must start the training."""
    worker, dev, r = env
    job = make_job(dev.id, N)
    dev.cache_report(encode(job)[1], job)
    batch = make_batch(job)
    worker.cache.put_batch(dev.id, batch.keys, batch.states)  # cached, never counted
    assert r.zcard(key("need", dev.id, job.job_id)) == N
    time.sleep(1.0)
    assert r.hget(key("job", dev.id, job.job_id), "state") == b"waiting"

    start = len(dev.down)
    rep = dev.cache_report(fresh_envelope(job), job)
    assert rep.missing == ()
    done = dev.down.wait(lambda m: isinstance(m, Progress) and m.job_id == job.job_id and m.state == "done", 20,
                         f"job {job.job_id} done", start)
    assert isinstance(done, Progress)
    assert worker.stats.jobs_trained == 1
    assert not dev.down.since(0, Rejection)
