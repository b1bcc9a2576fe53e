"""Faults (DESIGN §6): broker restart, worker killed mid-training, Redis restart, agent restarted mid-upload.

Each fault hits a real round (tiny llama, real mosquitto and Redis) at the
moment named; the round must still finish with nothing lost: every sample
cached, one forward pass per sample, one adapter version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeSettings
from edge_agent.ledger import Ledger
from schemas import (
    AdapterUpdate,
    CacheReport,
    HyperParams,
    Job,
    Message,
    Progress,
    decode,
    encode,
    topic,
)
from side_server.cache import ActivationCache
from side_server.store import key
from side_server.worker import Worker
from sidetune.services import SERVER_USER
from tests.loop_helpers import (
    AgentThread,
    Downlinks,
    clear_device,
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

pytestmark = pytest.mark.integration

N = 160
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


class Fleet:
    """Settings and cleanup for one test: a device, workers in a share group of their own, Redis."""

    def __init__(self, tmp: Path, backbone: Path, mosquitto, redis_url: str, accounts: dict[str, str],
                 device: tuple[str, str], mqtt_client) -> None:
        self.tmp, self.backbone, self.mosquitto, self.redis_url = tmp, backbone, mosquitto, redis_url
        self.accounts, self.mqtt_client = accounts, mqtt_client
        self.device, self.password = device
        self.group = f"faults-{uuid.uuid4().hex[:8]}"
        self.worker_ids: list[str] = []
        self.r = redis.Redis.from_url(redis_url)
        self.down = Downlinks(mqtt_client(self.device, self.password), self.device)

    def edge(self, **kw: object) -> EdgeSettings:
        base: dict[str, object] = dict(upload_batch=2, round_timeout=60.0,
                                       hyper=HyperParams(epochs=5, lr=3e-3, batch_size=32))
        base.update(kw)
        return edge_settings(self.tmp, self.backbone, self.mosquitto, self.device, self.password, **base)

    def worker_settings(self, **kw: object):
        wid = kw.pop("worker_id", None) or f"{self.group}-w{len(self.worker_ids) + 1}"
        self.worker_ids.append(str(wid))
        return server_settings(self.mosquitto, self.redis_url, self.accounts[SERVER_USER], worker_id=wid,
                               share_group=self.group, lease_seconds=3.0, **kw)

    def close(self) -> None:
        self.r.close()
        clear_device(self.mqtt_client, self.device, self.worker_ids)

    def start_round(self, agent: EdgeAgent, n: int = N, seed: int = 1) -> None:
        request_round(agent, make_samples(n, seed=seed))

    def assert_nothing_lost(self, row: dict[str, object], job_keys: tuple[str, ...], n: int = N) -> None:
        """The round finished, each sample was computed once, the server holds every sample and one adapter."""
        assert row["state"] == "done", row
        assert row["samples"] == n and row["new_samples"] == n, row
        assert row["forward_passes"] == n, row  # no sample computed twice
        assert row["adapter_version"] == 1, row
        assert ActivationCache(self.r, 3600).missing(self.device, job_keys) == []
        assert self.r.get(key("adapter_ver", self.device)) == b"1"
        versions = {m.version for m in self.down.of(AdapterUpdate)}  # type: ignore[attr-defined]
        assert versions == {1}, versions


@pytest.fixture
def fleet(tmp_path, tiny_backbone, mosquitto, redis_url, broker_accounts, device_account, mqtt_client) -> Iterator[Fleet]:
    f = Fleet(tmp_path, tiny_backbone, mosquitto, redis_url, broker_accounts, device_account, mqtt_client)
    try:
        yield f
    finally:
        f.close()


def job_of(agent: EdgeAgent, device: str) -> Job:
    """The job of the agent's first round, as its ledger keeps it."""
    led = Ledger(agent.state_dir / "state.db")
    try:
        payload = led.db.execute("SELECT job_payload FROM rounds WHERE round=1").fetchone()[0]
    finally:
        led.close()
    job = decode(topic(device, "jobs"), payload)
    assert isinstance(job, Job)
    return job


def mid_upload(worker: Worker, n: int = N) -> Callable[[], bool]:
    """True while the worker holds some but not all of the round's samples."""
    return lambda: 0 < worker.stats.samples_cached < n


def checkpoint_epoch(r: redis.Redis, device: str, job_id: str) -> int:
    blob = r.get(key("ckpt", device, job_id))
    assert blob is not None, "no checkpoint in Redis"
    n = int.from_bytes(blob[:8], "little")
    return int(json.loads(blob[8 : 8 + n])["__metadata__"]["epoch"])


def answered(fleet: Fleet, job: Job) -> bool:
    return any(m.job_id == job.job_id for m in fleet.down.of(CacheReport))  # type: ignore[attr-defined]


def wait_quietly(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def wait_until_answering(fleet: Fleet, dev) -> None:
    """Probe jobs until a worker answers one (it subscribes in its connect callback)."""
    for _ in range(40):
        probe = make_job(fleet.device, n=1)
        dev.publish(*encode(probe), qos=1).wait_for_publish(5)
        if wait_quietly(lambda p=probe: answered(fleet, p), 0.5):  # type: ignore[misc]
            return
    raise AssertionError("no worker answers")


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "sidetune.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)


def server_process(fleet: Fleet, tmp: Path, name: str) -> subprocess.Popen[bytes]:
    s = fleet.worker_settings(worker_id=f"{fleet.group}-{name}")
    conf = tmp / f"{name}.toml"
    conf.write_text(
        f'broker_port = {s.broker_port}\nbroker_username = "{s.broker_username}"\n'
        f'broker_password = "{s.broker_password}"\nredis_url = "{s.redis_url}"\nworker_id = "{s.worker_id}"\n'
        f'share_group = "{s.share_group}"\nlease_seconds = {s.lease_seconds}\ntorch_threads = 1\n')
    return spawn(["server", "--config", str(conf)], tmp / f"{name}.log")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    def there() -> bool:
        assert proc.poll() is None, f"{log.name}: exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
        return log.exists() and text in log.read_text()

    wait_for(there, timeout, f"{text!r} in {log.name}")


# --------------------------------------------------------------------------- (a) broker restart


def test_broker_restart_mid_upload(fleet, mosquitto):
    worker = start_worker(fleet.worker_settings())
    try:
        # A short round timeout: uplinks the broker drops while the workers' shared subscription is gone
        # (see the xfail below) come back only when the board resends its job, and the board re-uploads
        # a key at most every 30 s (EdgeAgent._upload): such a run takes ~30 s instead of ~3 s.
        with AgentThread(EdgeAgent(fleet.edge(round_timeout=5.0))) as agent:
            fleet.start_round(agent)
            wait_for(mid_upload(worker), 30, "the upload to begin", poll=0.005)
            cached_at_restart = worker.stats.samples_cached
            mosquitto.restart()
            assert cached_at_restart < N  # the broker went away with the upload unfinished
            row = wait_for(lambda: round_state(agent, 1), 50, "round 1 after the broker restart")
            fleet.assert_nothing_lost(row, job_of(agent, fleet.device).keys)  # type: ignore[arg-type]
    finally:
        worker.stop()


def test_a_job_stored_before_a_broker_restart_is_answered_again_after_it(fleet, mosquitto, mqtt_client):
    """mosquitto 2.0.11 does not keep shared subscriptions across its restart, so the
    worker re-announces what every waiting job still lacks once it is back."""
    worker = start_worker(fleet.worker_settings())
    try:
        board = mqtt_client(fleet.device, fleet.password)
        wait_until_answering(fleet, board)
        job = make_job(fleet.device, n=1)
        board.publish(*encode(job), qos=1).wait_for_publish(5)
        wait_for(lambda: answered(fleet, job), 5, "the first answer")
        mosquitto.restart()
        reports: list[Message] = []
        subscribed = threading.Event()
        board = mqtt_client(fleet.device, fleet.password)
        board.on_message = lambda c, u, m: reports.append(decode(m.topic, m.payload))
        board.on_subscribe = lambda *_: subscribed.set()
        board.subscribe(topic(fleet.device, "cache"), qos=1)
        assert subscribed.wait(5)
        wait_for(lambda: any(getattr(m, "job_id", None) == job.job_id for m in reports), 20,
                 "the worker to re-announce the waiting job after reconnecting")
    finally:
        worker.stop()


def test_the_outbox_drains_after_a_publish_raced_with_a_broker_outage(fleet, mosquitto, tmp_path):
    from edge_agent.outbox import OutboxSender
    from schemas.transport import BrokerAddress, Transport

    ledger = Ledger(tmp_path / "outbox.db")
    transport = Transport(f"outbox-{fleet.group}", BrokerAddress("127.0.0.1", mosquitto.port, fleet.device,
                                                                 fleet.password), lambda _m: None).start()
    outbox = OutboxSender(ledger, transport)
    outbox.start()
    try:
        mosquitto.stop()
        wait_for(lambda: not transport.connected.is_set(), 10, "paho to notice the outage")
        # the race: the outbox read `connected` just before paho noticed the socket was gone
        transport.connected.set()
        ledger.enqueue([(*encode(make_job(fleet.device, n=1)), False)])
        outbox.kick()
        time.sleep(0.5)
        transport.connected.clear()
        mosquitto.start()
        wait_for(lambda: transport.connected.is_set(), 15, "paho to reconnect")
        ledger.enqueue([(*encode(make_job(fleet.device, n=1)), False)])
        outbox.kick()
        wait_for(lambda: ledger.outbox_size() == 0, 5, "the outbox to drain")
    finally:
        if mosquitto.proc is None or mosquitto.proc.poll() is not None:
            mosquitto.start()
        outbox.stop()
        transport.stop()
        ledger.close()


# --------------------------------------------------------------------------- (b) worker killed mid-training


def test_worker_killed_mid_training_resumes_from_its_checkpoint(fleet, tmp_path):
    epochs = 60
    first = server_process(fleet, tmp_path, "w1")
    second = None
    try:
        wait_log(tmp_path / "w1.log", "up: broker", first)
        with AgentThread(EdgeAgent(fleet.edge(upload_batch=32, hyper=HyperParams(epochs=epochs, lr=3e-3,
                                                                                   batch_size=8)))) as agent:
            fleet.start_round(agent)
            wait_for(lambda: fleet.down.of(Progress) and any(p.state == "training" for p in fleet.down.of(Progress)),
                     40, "the first training epoch", poll=0.002)
            stop(first, signal.SIGKILL)
            job = job_of(agent, fleet.device)
            killed_at = checkpoint_epoch(fleet.r, fleet.device, job.job_id)
            assert 1 <= killed_at < epochs, killed_at
            time.sleep(0.3)  # whatever the dead worker published has arrived by now
            restarted = time.monotonic()
            second = server_process(fleet, tmp_path, "w2")
            row = wait_for(lambda: round_state(agent, 1), 40, "round 1 after the worker was killed")
            fleet.assert_nothing_lost(row, job.keys)
        resumed = [p.epoch for p in fleet.down.of(Progress, after=restarted) if p.state == "training"]  # type: ignore[attr-defined]
        assert resumed == list(range(killed_at + 1, epochs + 1)), resumed  # from the checkpoint on, not from 1
        assert len(fleet.down.of(AdapterUpdate)) == 1
    finally:
        stop(first)
        if second is not None:
            stop(second)


def test_a_worker_restarted_under_a_new_id_still_receives_every_uplink(fleet, mqtt_client):
    dev = mqtt_client(fleet.device, fleet.password)
    old = start_worker(fleet.worker_settings())  # the service as first started ...
    wait_until_answering(fleet, dev)
    old.stop()  # ... stopped (or killed) and started again: a new pid, so a new worker id
    new = start_worker(fleet.worker_settings())
    try:
        wait_until_answering(fleet, dev)
        jobs = [make_job(fleet.device, n=1) for _ in range(4)]
        for j in jobs:
            dev.publish(*encode(j), qos=1).wait_for_publish(5)
        wait_quietly(lambda: all(answered(fleet, j) for j in jobs), 3)
        assert [answered(fleet, j) for j in jobs] == [True] * len(jobs)
    finally:
        new.stop()


def test_a_job_half_written_by_a_killed_worker_is_answered_when_it_comes_again(fleet, mqtt_client):
    worker = start_worker(fleet.worker_settings())
    try:
        job = make_job(fleet.device, n=3)
        # the state a kill -9 between the HSETNX and the pipeline of JobStore.create leaves behind
        dev = mqtt_client(fleet.device, fleet.password)
        wait_until_answering(fleet, dev)
        fleet.r.hset(key("job", fleet.device, job.job_id), "payload", encode(job)[1])
        dev.publish(*encode(job), qos=1).wait_for_publish(5)
        wait_for(lambda: answered(fleet, job), 3, "an answer to the job")
    finally:
        worker.stop()


# --------------------------------------------------------------------------- (c) Redis restart


def test_redis_restart_mid_upload_and_mid_training(fleet, redis_server):
    worker = start_worker(fleet.worker_settings())
    try:
        settings = fleet.edge(hyper=HyperParams(epochs=40, lr=3e-3, batch_size=8))
        with AgentThread(EdgeAgent(settings)) as agent:
            fleet.start_round(agent)
            wait_for(mid_upload(worker), 30, "the upload to begin", poll=0.005)
            redis_server.restart()
            wait_for(lambda: any(p.state == "training" for p in fleet.down.of(Progress)), 30,  # type: ignore[attr-defined]
                     "training", poll=0.005)
            redis_server.restart()
            assert not any(p.state == "done" for p in fleet.down.of(Progress))  # type: ignore[attr-defined]
            row = wait_for(lambda: round_state(agent, 1), 40, "round 1 after two Redis restarts")
            fleet.assert_nothing_lost(row, job_of(agent, fleet.device).keys)  # type: ignore[arg-type]
        epochs = [p.epoch for p in fleet.down.of(Progress) if p.state == "training"]  # type: ignore[attr-defined]
        assert epochs == sorted(set(epochs)) and epochs[-1] == 40, epochs  # in order, none announced twice
        # an epoch's progress is sent after its checkpoint is stored; a restart can drop the reply of that
        # store after it was done, and with it the epoch's progress message (seen once in CI)
        assert len(epochs) >= 39, epochs
        # resumed from its checkpoint, not from the start: at most the epoch in flight is trained again
        assert 40 <= worker.stats.epochs_trained <= 41, worker.stats.epochs_trained
    finally:
        worker.stop()


# --------------------------------------------------------------------------- (d) agent restarted mid-upload


def test_agent_stopped_mid_upload_and_started_again(fleet):
    worker = start_worker(fleet.worker_settings())
    try:
        settings = fleet.edge()
        agent = EdgeAgent(settings)
        with AgentThread(agent):
            fleet.start_round(agent)
            # stopped mid-upload; while it stops, the worker may still store all the agent had
            # already handed to the broker (a fast worker often does: not asserted)
            wait_for(mid_upload(worker), 30, "the upload to begin", poll=0.005)
        with AgentThread(EdgeAgent(settings)) as again:
            row = wait_for(lambda: round_state(again, 1), 40, "round 1 after the agent restarted")
            fleet.assert_nothing_lost(row, job_of(again, fleet.device).keys)  # type: ignore[arg-type]
            assert len(again.ledger.rounds()) == 1
    finally:
        worker.stop()


def test_agent_killed_mid_upload_and_started_again(fleet, tmp_path):
    """The same with ``kill -9`` of an ``sidetune edge run`` process: its paho session and in-flight messages die."""
    worker = start_worker(fleet.worker_settings())
    proc = None
    try:
        settings = fleet.edge()
        (settings.state_dir / "inbox").mkdir(parents=True, exist_ok=True)
        conf = tmp_path / "edge.toml"
        h = settings.hyper
        conf.write_text(
            f'device_id = "{settings.device_id}"\npassword = "{settings.password}"\n'
            f'broker_port = {settings.broker_port}\nstate_dir = "{settings.state_dir}"\n'
            f'backbone_dir = "{settings.backbone_dir}"\ntask_file = "{settings.task_file}"\n'
            f'max_length = {settings.max_length}\nmin_new_samples = {settings.min_new_samples}\n'
            f'upload_batch = {settings.upload_batch}\nout_dim = {settings.out_dim}\ntaps = {list(settings.taps or [])}\n'
            f'round_timeout = {settings.round_timeout}\ntrain_on = "{settings.train_on}"\n\n'
            f'[hyper]\nepochs = {h.epochs}\nlr = {h.lr}\nbatch_size = {h.batch_size}\n')
        proc = spawn(["edge", "run", "--config", str(conf)], tmp_path / "edge.log")
        write_jsonl(settings.state_dir / "inbox" / "a.jsonl", make_samples(N, seed=1))
        wait_log(tmp_path / "edge.log", "up: backbone", proc)
        (settings.state_dir / "train.request").touch()
        wait_for(mid_upload(worker), 40, "the upload to begin", poll=0.005)
        stop(proc, signal.SIGKILL)
        assert worker.stats.samples_cached < N
        with AgentThread(EdgeAgent(settings)) as again:
            row = wait_for(lambda: round_state(again, 1), 40, "round 1 after the agent was killed")
            fleet.assert_nothing_lost(row, job_of(again, fleet.device).keys)  # type: ignore[arg-type]
            assert len(again.ledger.rounds()) == 1
    finally:
        if proc is not None:
            stop(proc, signal.SIGKILL)
        worker.stop()
