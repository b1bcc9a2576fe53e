"""The server on a real Redis Cluster (3 masters + 3 replicas on loopback, tests/cluster_helpers.py).

Every script and pipeline of the store and the cache runs on it (one device's keys in one slot,
devices spread over the masters); the whole loop on the tiny llama; and the Redis faults of
tests/test_faults.py on the cluster: the master holding the device's slot fails over to its
replica mid-upload (CLUSTER FAILOVER) and is killed mid-training (its replica is promoted), and a
master restarts: each round finishes with nothing lost.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from edge_agent.agent import EdgeAgent
from schemas import HyperParams, Progress, WireTensor
from side_server.cache import ActivationCache, act_key
from side_server.config import ServerSettings
from side_server.redis_client import connect
from side_server.store import READY, JobStore, key
from sidetune.services import SERVER_USER
from tests.cluster_helpers import RedisClusterProcs
from tests.loop_helpers import (
    AgentThread,
    edge_settings,
    make_job,
    make_samples,
    request_round,
    round_state,
    server_settings,
    start_worker,
    wait_for,
    write_jsonl,
)
from tests.test_faults import Fleet, N, job_of, mid_upload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    cluster = RedisClusterProcs(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except Exception as e:
        pytest.fail(f"the redis cluster did not start: {e}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterProcs) -> str:
    """The cluster's URL, every node running (a test may have killed one), every master emptied."""
    for node in redis_cluster.nodes:
        if not node.running:
            node.start()
    redis_cluster.wait_ok()
    for m in redis_cluster.masters_now():
        with m.client() as c:
            c.flushall()
    return redis_cluster.url


@pytest.fixture
def rc(cluster_url: str) -> Iterator[redis.Redis]:
    r = connect(ServerSettings(redis_url=cluster_url))
    yield r
    r.close()


# --------------------------------------------------------------------------- configuration


def test_the_url_names_a_cluster_and_a_bad_one_is_refused(redis_cluster):
    from schemas.errors import ConfigurationError, UnavailableError
    from side_server.redis_client import is_cluster

    assert is_cluster(redis_cluster.url) and not is_cluster("redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigurationError, match="database 0 only"):
        connect(ServerSettings(redis_url=redis_cluster.url + "/2"))
    wrong = redis_cluster.url.replace(redis_cluster.password, "not-the-password")
    with pytest.raises(ConfigurationError, match="refused the password"):
        connect(ServerSettings(redis_url=wrong))
    with pytest.raises(UnavailableError, match="unavailable"):
        connect(ServerSettings(redis_url="redis+cluster://:pw@127.0.0.1:1"))


# --------------------------------------------------------------------------- every script, one slot each


def test_every_script_and_pipeline_runs_on_one_slot_and_devices_spread(rc, redis_cluster):
    store, cache = JobStore(rc), ActivationCache(rc, ttl=60, quota=10**9)
    devices = [f"dev-{i:02d}" for i in range(12)]
    masters = {redis_cluster.master_of(key("usage", d)).port for d in devices}
    assert len(masters) == 3, masters  # 12 devices over the 3 masters
    for d in devices:
        job = make_job(d, n=6)
        assert store.allow_message(d, 50.0, 10) == (True, False)
        assert store.create(job, list(job.keys), 1000, 16, 10**6)
        assert not store.create(job, list(job.keys), 1000, 16, 10**6)  # a resend changes nothing
        spec = job.spec
        states = WireTensor.from_array(np.ones((6, spec.num_states, spec.width)), "float16")
        cache.put_batch(d, job.keys[:3], WireTensor.from_array(np.ones((3, spec.num_states, spec.width)), "float16"))
        assert store.received(d, job.job_id, job.keys[:3]) == 3
        assert cache.missing(d, job.keys) == list(job.keys[3:])
        cache.put_batch(d, job.keys, states)
        assert store.received(d, job.job_id, job.keys) == 0
        assert (d, job.job_id) in [(x, y) for x, y, _ in store.ready()]
        store.need(d, job.job_id, [job.keys[0]])  # gone again: waiting, not ready
        assert (d, job.job_id) not in [(x, y) for x, y, _ in store.ready()]
        assert store.received(d, job.job_id, [job.keys[0]]) == 0
        got, gone = cache.get_many(d, job.keys, spec.taps)
        assert gone == [] and got is not None and got.shape == (6, len(spec.taps), spec.width)
        assert store.lease(d, job.job_id, "w1", 5) == 1 and store.lease(d, job.job_id, "w2", 5) == 0
        assert store.renew(d, job.job_id, "w1", 5)
        assert store.save_checkpoint(d, job.job_id, "w1", b"ckpt")
        assert store.checkpoint(d, job.job_id) == b"ckpt"
        assert store.assign_version(d, job.job_id) == 1
        store.save_adapter(d, 1, b"weights")
        store.charge_service(d, 0.5)
        store.release(d, job.job_id, "w1")
        rc.delete(act_key(d, job.keys[0]))  # as an eviction would
        assert cache.reconcile(d, force=True) > 0
        store.finish(d, job.job_id)
        assert store.usage(d)["jobs"] == 0
        # all of the device's keys in its one slot
        slots = {int(rc.execute_command("CLUSTER KEYSLOT", k)) for k in
                 (key("job", d, job.job_id), key("usage", d), act_key(d, job.keys[1]), key("seen", d))}
        assert len(slots) == 1, slots
    assert store.active() == [] and rc.zcard(READY) == 0
    assert set(store.silent_since(devices)) == set(devices) and all(store.silent_since(devices).values())
    assert store.leased([(d, "none") for d in devices]) == [False] * len(devices)
    assert set(store.service(devices)) == set(devices)


def test_the_fleet_records_on_the_cluster(rc):
    """side_server/fleet.py's records (per device hash-tagged, a few fleet-wide keys) work there too:
    what a worker writes is what `sidetune fleet` reads back."""
    from side_server.fleet import FleetLog, device_detail, fleet_snapshot

    class Strict(FleetLog):
        def _dropped(self, what: str, e: Exception) -> None:
            raise e  # a record the cluster refused fails the test (the worker only logs it)

    log = Strict(rc)
    for d in ("dev-01", "dev-02", "dev-03"):
        log.status(d, "online", "1.0", 1, "ab" * 32, time.time(), None)
        log.round(d, {"round": 1, "samples": 10, "forward_passes": 10, "adapter_version": 1})
        log.job(d, "r1-x", samples=10, epochs=2)
        log.epoch(d, "r1-x", 1, 0.5, 0.6)
        log.job_state(d, "r1-x", "done")
        log.rejection(d, "invalid", "a test rejection")
    snap = fleet_snapshot(rc)
    assert len(snap["devices"]) == 3 and len(snap["jobs"]) == 3
    assert device_detail(rc, "dev-02") is not None


# --------------------------------------------------------------------------- the upload window


def test_the_server_asks_for_a_window_at_a_time(mosquitto, redis_url, broker_accounts, mqtt_client,
                                                device_account):
    """With upload_window_bytes of 4 samples (fp16 states of SPEC), a job of 10 is asked for 4 keys,
    in the job's order, then the next ones as each batch is stored, and nothing is asked twice."""
    from schemas import CacheReport, encode
    from tests.loop_helpers import SPEC, make_batch, worker_and_device

    window = 4 * 2 * SPEC.num_states * SPEC.width
    with worker_and_device(mosquitto, redis_url, broker_accounts, mqtt_client, device_account, "win",
                           upload_window_bytes=window) as (worker, dev):
        job = make_job(dev.id, n=10)
        first = dev.job_answered(job)
        assert first.missing == job.keys[:4] and first.total == 10
        at = len(dev.down)
        dev.publish(*encode(make_batch(job, job.keys[:3])))
        nxt = dev.down.wait(lambda m: isinstance(m, CacheReport) and m.job_id == job.job_id, 10, "the next window", at)
        assert nxt.missing == job.keys[3:7]  # type: ignore[attr-defined]
        at = len(dev.down)
        dev.publish(*encode(make_batch(job, job.keys[3:10])))
        done = dev.down.wait(lambda m: isinstance(m, Progress) and m.job_id == job.job_id and m.state == "done",
                             20, "the job trained", at)
        assert done is not None
        assert not dev.down.since(at, CacheReport)  # everything came: nothing more asked


# --------------------------------------------------------------------------- the whole loop


def test_the_whole_loop_on_the_cluster(tmp_path, tiny_backbone, mosquitto, cluster_url, broker_accounts,
                                       device_account):
    device, password = device_account
    holdout = write_jsonl(tmp_path / "holdout.jsonl", make_samples(200, seed=99))
    # the loop on a cluster, not label-DP: no label noise (at ε = 2 the tiny task's +0.1 margin failed twice here)
    settings = edge_settings(tmp_path, tiny_backbone, mosquitto, device, password, holdout_file=holdout,
                             label_epsilon=float("inf"))
    worker = start_worker(server_settings(mosquitto, cluster_url, broker_accounts[SERVER_USER],
                                          worker_id=f"cl-{uuid.uuid4().hex[:8]}", share_group=f"cl-{uuid.uuid4().hex[:8]}"))
    try:
        with AgentThread(EdgeAgent(settings)) as agent:
            request_round(agent, make_samples(300, seed=1))
            r1 = wait_for(lambda: round_state(agent, 1), 120, "round 1")
            assert r1["state"] == "done", r1
            assert r1["forward_passes"] == 300 and r1["new_samples"] == 300
            assert r1["tuned_accuracy"] > r1["zero_shot_accuracy"] + 0.1, r1
            request_round(agent, make_samples(100, seed=2), "b.jsonl", "the second file")
            r2 = wait_for(lambda: round_state(agent, 2), 120, "round 2")
            assert r2["state"] == "done" and r2["samples"] == 400, r2
            assert r2["forward_passes"] == 100  # round 1's samples came from the cluster's cache
            assert r2["adapter_version"] == 2
    finally:
        worker.stop()


# --------------------------------------------------------------------------- Redis faults on the cluster


class ClusterFleet(Fleet):
    """tests/test_faults.py's Fleet with the cluster as its Redis."""

    def __init__(self, tmp: Path, backbone: Path, mosquitto, cluster: RedisClusterProcs, accounts, device,
                 mqtt_client) -> None:
        super().__init__(tmp, backbone, mosquitto, "redis://127.0.0.1:1/0", accounts, device, mqtt_client)
        self.r.close()
        self.redis_url = cluster.url
        self.r = connect(ServerSettings(redis_url=cluster.url))
        self.cluster = cluster

    def master(self):
        """The master holding this device's slot now."""
        return self.cluster.master_of(key("usage", self.device))


@pytest.fixture
def cfleet(tmp_path, tiny_backbone, mosquitto, cluster_url, redis_cluster, broker_accounts, device_account,
           mqtt_client) -> Iterator[ClusterFleet]:
    f = ClusterFleet(tmp_path, tiny_backbone, mosquitto, redis_cluster, broker_accounts, device_account, mqtt_client)
    try:
        yield f
    finally:
        f.close()


def training(fleet: Fleet) -> bool:
    return any(p.state == "training" for p in fleet.down.of(Progress))  # type: ignore[attr-defined]


def test_failover_mid_upload_and_a_master_killed_mid_training(cfleet):
    """The device's master hands over to its replica mid-upload (CLUSTER FAILOVER: no write lost);
    then the new master is killed (SIGKILL) mid-training and its replica promoted after the node
    timeout. The worker waits through both; the round finishes with nothing lost, trained once."""
    worker = start_worker(cfleet.worker_settings())
    try:
        settings = cfleet.edge(hyper=HyperParams(epochs=40, lr=3e-3, batch_size=8))
        with AgentThread(EdgeAgent(settings)) as agent:
            cfleet.start_round(agent)
            wait_for(mid_upload(worker), 30, "the upload to begin", poll=0.005)
            first = cfleet.master()
            promoted = cfleet.cluster.failover(first)
            assert cfleet.master().port == promoted.port != first.port
            wait_for(lambda: training(cfleet), 30, "training", poll=0.005)
            killed_at = time.monotonic()
            promoted.kill()
            row = wait_for(lambda: round_state(agent, 1), 60, "round 1 after the failover and the kill")
            assert cfleet.master().port not in (promoted.port,)
            cfleet.assert_nothing_lost(row, job_of(agent, cfleet.device).keys)  # type: ignore[arg-type]
        epochs = [p.epoch for p in cfleet.down.of(Progress) if p.state == "training"]  # type: ignore[attr-defined]
        assert epochs[-1] == 40 and epochs == sorted(epochs), epochs
        after = [p.epoch for p in cfleet.down.of(Progress, after=killed_at) if p.state == "training"]  # type: ignore[attr-defined]
        assert after, "no epoch trained after the kill"
    finally:
        worker.stop()


def test_a_master_restart_mid_upload(cfleet):
    """The device's master stops and starts again (within the node timeout: no failover): its
    append-only file brings the job back and the round finishes."""
    worker = start_worker(cfleet.worker_settings())
    try:
        with AgentThread(EdgeAgent(cfleet.edge())) as agent:
            cfleet.start_round(agent)
            wait_for(mid_upload(worker), 30, "the upload to begin", poll=0.005)
            node = cfleet.master()
            node.stop()
            node.start()
            row = wait_for(lambda: round_state(agent, 1), 60, "round 1 after the master restarted")
            cfleet.assert_nothing_lost(row, job_of(agent, cfleet.device).keys)  # type: ignore[arg-type]
        assert worker.stats.samples_cached >= N
    finally:
        worker.stop()
