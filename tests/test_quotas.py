"""Per-device quotas against a real worker, Redis and mosquitto (issue 9, DESIGN.md §8).

Every quota rejects with its own code, names its setting, and leaves Redis as it was; closed
jobs expire; a full Redis refuses new work once (no retry loop) and still finishes the jobs it
holds; a giant side network is refused before anything is allocated; a job that keeps killing
its workers is failed.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from typing import Any

import numpy as np
import pytest
import redis

from schemas import (
    AdapterUpdate,
    CacheReport,
    HyperParams,
    Job,
    Progress,
    Rejection,
    SideNetSpec,
    WireTensor,
    encode,
)
from side_server.cache import ActivationCache, act_key
from side_server.config import Quotas
from side_server.quotas import (
    QUOTA_SETTINGS,
    SERVER_FULL,
    cache_bytes_per_sample,
    record_bytes,
    train_memory,
)
from side_server.store import JobStore, key
from tests.loop_helpers import FINGERPRINT, SPEC, Device, make_batch, make_job, worker_and_device

pytestmark = pytest.mark.integration

#: Keys a message may touch even when it is rejected: the device's token bucket, when it was
#: last heard from, and the training time of devices (scheduling); and the fleet's records of
#: rejections (side_server/fleet.py: counts and the last reasons, bounded, expiring).
BOOKKEEPING = (b"st:rate:", b"st:seen", b"st:service", b"sidetune:fleet:")


def snapshot(r: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key's serialised value (DUMP), but for the bookkeeping a rejected message may touch."""
    return {k: r.dump(k) for k in r.scan_iter(count=1000) if not k.startswith(BOOKKEEPING)}


def job_of(device: str, n: int, spec: SideNetSpec = SPEC, hyper: HyperParams | None = None) -> Job:
    rng = np.random.default_rng()
    return Job(device_id=device, job_id=f"j-{uuid.uuid4().hex[:10]}", backbone_fingerprint=FINGERPRINT, spec=spec,
               hyper=hyper or HyperParams(epochs=2, batch_size=4), keys=tuple(secrets.token_hex(32) for _ in range(n)),
               targets=WireTensor.from_array(rng.normal(size=(n, spec.out_dim)), "float32"))


def rejection(dev: Device, start: int, what: str, timeout: float = 10) -> Rejection:
    rej = dev.down.wait(lambda m: isinstance(m, Rejection), timeout, what, start)
    assert isinstance(rej, Rejection)
    return rej


def assert_quota(rej: Rejection, code: str) -> None:
    assert rej.code == code, rej
    assert rej.reason.startswith(f"{code} ({QUOTA_SETTINGS[code]} = "), rej.reason


@pytest.fixture
def env(mosquitto, redis_url, broker_accounts, mqtt_client, device_account):
    """``start(**settings)``: a worker with these settings and a device it answers; Redis as a client."""
    r = redis.Redis.from_url(redis_url)
    stack: list[Any] = []

    def start(**kw: object) -> tuple[Any, Device]:
        cm = worker_and_device(mosquitto, redis_url, broker_accounts, mqtt_client, device_account, "quota", **kw)
        stack.append(cm)
        return cm.__enter__()

    try:
        yield start, r
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)
        r.close()


# --------------------------------------------------------------------------- jobs


BIG_SPEC = SideNetSpec(num_states=5, width=16, taps=(2, 4), out_dim=4, bottleneck=64)
HYPER = HyperParams(epochs=2, batch_size=4)

#: case -> (quotas, the job that passes them not, its code). The fixture's probe job (1 sample of
#: SPEC) passes every one of these quotas.
JOB_CASES: dict[str, tuple[dict[str, int], tuple[int, SideNetSpec], str]] = {
    "samples per job": ({"samples_per_job": 5}, (6, SPEC), "quota_samples"),
    "epochs x samples": ({"epoch_samples": 10}, (6, SPEC), "quota_work"),
    "side-network parameters": ({"sidenet_params": 1000}, (6, BIG_SPEC), "quota_sidenet"),
    "training memory": ({"train_memory_bytes": train_memory(SPEC, HYPER, 1) + 100}, (200, SPEC), "quota_memory"),
    "job-record bytes": ({"record_bytes": record_bytes(SPEC, 1) + 100}, (50, SPEC), "quota_records"),
    "cached bytes (the job's least)": ({"cache_bytes": cache_bytes_per_sample(SPEC) + 100}, (10, SPEC), "quota_cache"),
}


@pytest.mark.parametrize("case", list(JOB_CASES), ids=list(JOB_CASES))
def test_a_job_over_a_quota_is_rejected_with_its_code_and_stores_nothing(case, env):
    quotas, (n, spec), code = JOB_CASES[case]
    start, r = env
    worker, dev = start(quotas=Quotas(**quotas))
    job = job_of(dev.id, n, spec)
    before = snapshot(r)
    at = len(dev.down)
    dev.send(job)
    rej = rejection(dev, at, f"the rejection of {case}")
    assert_quota(rej, code)
    assert rej.ref_msg_id == job.msg_id
    assert snapshot(r) == before
    assert worker.stats.by_code == {code: 1}
    assert not dev.down.since(at, CacheReport)


def test_jobs_in_flight_per_device(env):
    start, r = env
    worker, dev = start(quotas=Quotas(jobs_in_flight=3))
    store = JobStore(r)
    while store.usage(dev.id)["jobs"] < 3:  # the fixture's probe jobs count too
        dev.job_answered(make_job(dev.id))
    before = snapshot(r)
    at = len(dev.down)
    job = make_job(dev.id)
    dev.send(job)
    assert_quota(rejection(dev, at, "the rejection of a fourth job"), "quota_jobs")
    assert snapshot(r) == before
    # a finished job gives its place back
    done = make_job(dev.id, n=4)
    assert store.usage(dev.id)["jobs"] == 3
    for d, j in store.active():
        store.fail(d, j, "test: make room")
    assert store.usage(dev.id) == {"jobs": 0, "job_bytes": 0, "cache_bytes": 0}
    dev.job_answered(done)


def test_cached_bytes_per_device_at_upload(env):
    """A batch that would take the device past its cache quota is refused whole; a smaller one fits."""
    start, r = env
    per_int8 = cache_bytes_per_sample(SPEC)  # 361: int8 rows and scales, header, bookkeeping
    per_fp16 = 5 + SPEC.num_states * SPEC.width * 2 + 256
    worker, dev = start(quotas=Quotas(cache_bytes=3 * per_fp16 + 3 * per_int8 + 50))
    job = make_job(dev.id, n=6)
    dev.job_answered(job)
    p = dev.progress(encode(make_batch(job, job.keys[:3]))[1], job)
    assert p.samples_cached == 3
    assert JobStore(r).usage(dev.id)["cache_bytes"] == 3 * per_fp16
    before = snapshot(r)
    at = len(dev.down)
    dev.send(make_batch(job, job.keys[3:]))  # fp16: 3 * 421 more, over the quota
    assert_quota(rejection(dev, at, "the cache quota's rejection"), "quota_cache")
    assert snapshot(r) == before
    assert r.exists(*[act_key(dev.id, k) for k in job.keys[3:]]) == 0
    x = np.random.default_rng().normal(size=(3, SPEC.num_states, SPEC.width))
    small = make_batch(job, job.keys[3:], states=WireTensor.from_array(x, "int8"))
    at = len(dev.down)
    dev.send(small)
    dev.down.wait(lambda m: isinstance(m, AdapterUpdate) and m.job_id == job.job_id, 20, "the adapter", at)
    assert JobStore(r).usage(dev.id)["cache_bytes"] == 3 * per_fp16 + 3 * per_int8


def test_the_cache_quota_gives_back_what_expired_or_was_evicted(redis_url):
    r = redis.Redis.from_url(redis_url)
    cache = ActivationCache(r, ttl=1, quota=10_000)
    keys = tuple(secrets.token_hex(32) for _ in range(4))
    states = WireTensor.from_array(np.ones((4, 5, 16)), "float16")
    used = cache.put_batch("dev-q", keys, states)
    assert used == cache.used("dev-q") == 4 * 421
    r.delete(act_key("dev-q", keys[0]))  # as an eviction would
    assert cache.reconcile("dev-q", force=True) == 421
    assert cache.used("dev-q") == 3 * 421
    time.sleep(1.2)
    cache.reconcile("dev-q")
    assert cache.used("dev-q") == 0
    assert r.hlen(key("csize", "dev-q")) == 0 and r.zcard(key("cexp", "dev-q")) == 0
    r.close()


def test_message_rate_per_device(env):
    """A token bucket per device: past the burst, messages are dropped, with one rejection a second."""
    start, r = env
    worker, dev = start(quotas=Quotas(messages_per_second=2.0, message_burst=8))
    time.sleep(4)  # the probes' tokens come back
    at = len(dev.down)
    jobs = [make_job(dev.id, n=1) for _ in range(30)]
    for j in jobs:
        dev.send(j)
    rej = rejection(dev, at, "the rate quota's rejection")
    assert_quota(rej, "quota_rate")
    time.sleep(1.0)
    answered = {m.job_id for m in dev.down.since(at, CacheReport)}  # type: ignore[attr-defined]
    assert 8 <= len(answered) <= 12, len(answered)  # the burst, and what trickled back meanwhile
    rejections = dev.down.since(at, Rejection)
    assert 1 <= len(rejections) <= 3, rejections  # answered at most once a second: no amplification
    assert worker.stats.by_code["quota_rate"] == 30 - len(answered)
    time.sleep(1.0)
    dev.job_answered(make_job(dev.id, n=1))  # the bucket refills


# --------------------------------------------------------------------------- expiry


def test_finished_jobs_keep_a_small_record_that_expires(env):
    start, r = env
    worker, dev = start(closed_job_ttl=2)
    job = make_job(dev.id, n=8)
    dev.job_answered(job)
    at = len(dev.down)
    dev.send(make_batch(job))
    dev.down.wait(lambda m: isinstance(m, Progress) and m.job_id == job.job_id and m.state == "done", 20, "done", at)
    names = {k.decode() for k in r.scan_iter(match=f"st:*:{{{dev.id}}}:{job.job_id}")}
    assert names == {key("job", dev.id, job.job_id)}, names  # keys, targets, need set, checkpoint, lease: gone
    assert 0 < r.ttl(key("job", dev.id, job.job_id)) <= 2
    assert f"{dev.id}/{job.job_id}".encode() not in r.smembers("st:active")
    # a late resend of its activations changes nothing (no TTL refreshed, nothing stored)
    ttl = r.pttl(act_key(dev.id, job.keys[0]))
    time.sleep(0.05)
    dev.send(make_batch(job))
    dev.job_answered(make_job(dev.id, n=1))  # handled after it
    assert r.pttl(act_key(dev.id, job.keys[0])) < ttl
    time.sleep(2.2)
    assert not r.exists(key("job", dev.id, job.job_id))


def test_an_abandoned_job_is_closed_and_expires(env):
    start, r = env
    worker, dev = start(abandoned_after=1.0, closed_job_ttl=2)
    job = make_job(dev.id, n=8)
    dev.job_answered(job)
    at = len(dev.down)
    dev.publish(*encode(make_batch(job, job.keys[:4])))
    failed = dev.down.wait(lambda m: isinstance(m, Progress) and m.job_id == job.job_id and m.state == "failed",
                           10, "the abandoned job's end", at)
    assert isinstance(failed, Progress) and failed.detail.startswith("abandoned: nothing heard from the device")
    assert JobStore(r).usage(dev.id)["jobs"] == 0
    assert not r.exists(key("need", dev.id, job.job_id), key("keys", dev.id, job.job_id),
                        key("targets", dev.id, job.job_id))
    time.sleep(2.2)
    assert not r.exists(key("job", dev.id, job.job_id))


# --------------------------------------------------------------------------- side-network size


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


GIANT = SideNetSpec(num_states=1024, width=16384, taps=tuple(range(0, 1024, 4)), bottleneck=1024, out_dim=256)
#: within the parameter quota (20 M), but 20,000 samples of 32 taps of width 4,096 are 10 GiB of states
WIDE = SideNetSpec(num_states=33, width=4096, taps=tuple(range(1, 33)), bottleneck=8, out_dim=8)


@pytest.mark.parametrize(("spec", "n", "code"), [(GIANT, 1, "quota_sidenet"), (WIDE, 20_000, "quota_memory")],
                         ids=["8.6 G parameters", "10 GiB of training data"])
def test_a_giant_side_network_is_refused_before_anything_is_allocated(spec, n, code, env):
    start, r = env
    worker, dev = start()
    job = job_of(dev.id, n, spec, HyperParams(epochs=1, batch_size=8192))
    rss = rss_bytes()
    before = snapshot(r)
    at = len(dev.down)
    dev.send(job)
    assert_quota(rejection(dev, at, "the giant spec's rejection"), code)
    # a batch for it: there is no job to take it
    dev.send(make_batch(job, job.keys[:1], shape=(spec.num_states, 8)))
    assert rejection(dev, at + 1, "the batch's rejection").code == "unknown_job"
    grown = rss_bytes() - rss
    print(f"\nworker RSS grew by {grown / 2**20:.1f} MiB handling a {code} job")
    assert grown < 64 * 2**20, grown
    assert snapshot(r) == before


# --------------------------------------------------------------------------- a full Redis


def test_a_full_redis_refuses_new_work_once_and_finishes_what_it_holds(env):
    start, r = env
    worker, dev = start(train_slice=0.05)
    victim = job_of(dev.id, 16, SPEC, HyperParams(epochs=300, batch_size=2))
    dev.job_answered(victim)
    at = len(dev.down)
    dev.send(make_batch(victim))
    dev.down.wait(lambda m: isinstance(m, Progress) and m.job_id == victim.job_id and m.state == "training",
                  20, "the victim's training", at)
    limit = r.config_get("maxmemory")["maxmemory"]
    try:
        r.config_set("maxmemory", str(r.info("memory")["used_memory"] // 2))  # full: nothing may grow
        handled = worker.stats.received
        newcomer = make_job(dev.id, n=4)
        at2 = len(dev.down)
        dev.send(newcomer)
        rej = rejection(dev, at2, "the full Redis's rejection")
        assert rej.code == SERVER_FULL and rej.reason.startswith("server_full: ")
        time.sleep(1.5)  # a retry loop would show here
        assert worker.stats.received == handled + 1
        assert len(dev.down.since(at2, Rejection)) == 1
        assert r.exists(key("job", dev.id, newcomer.job_id)) == 0
        done = dev.down.wait(lambda m: isinstance(m, AdapterUpdate) and m.job_id == victim.job_id, 60,
                             "the victim's adapter while Redis is full", at)
        assert isinstance(done, AdapterUpdate) and done.version == 1
        print(f"\nRedis full at maxmemory {r.config_get('maxmemory')['maxmemory']}: "
              f"used_memory {r.info('memory')['used_memory']}")
    finally:
        r.config_set("maxmemory", limit)
    dev.job_answered(make_job(dev.id, n=4))  # room again: new work is taken


# --------------------------------------------------------------------------- a job that kills its workers


def test_a_job_that_kills_its_workers_is_failed_with_a_reason(env):
    """Two workers took the job's lease and died with it (a kill -9 never gives a lease back):
    the next worker to take it fails it instead of dying a third time."""
    start, r = env
    worker, dev = start(max_attempts=2, lease_seconds=0.3)
    store = JobStore(r)
    job = make_job(dev.id, n=6)
    dev.job_answered(job)
    for ghost in ("ghost-1", "ghost-2"):
        assert store.lease(dev.id, job.job_id, ghost, 0.3) > 0
        time.sleep(0.35)
    at = len(dev.down)
    dev.send(make_batch(job))
    failed = dev.down.wait(lambda m: isinstance(m, Progress) and m.job_id == job.job_id and m.state == "failed",
                           10, "the job's failure", at)
    assert isinstance(failed, Progress)
    assert "cut short 2 times" in failed.detail, failed.detail
    assert not dev.down.since(at, AdapterUpdate)
    assert store.get(dev.id, job.job_id).state == "failed"  # type: ignore[union-attr]
    assert store.usage(dev.id)["jobs"] == len(store.active())
