"""``sidetune bench fleet``: N simulated boards, each a full round of S samples, against W real workers.

Everything but the boards' forward passes is the product's own: a broker folder made by
``sidetune broker init`` and ``add-device`` (one account per board) in a temporary folder, the
mosquitto it configures (boards on its TLS listener, workers on the loopback plaintext one), the
Redis it configures (or a 3 + 3 Redis Cluster with its password, ``--cluster``), and W ``sidetune
server`` processes with its server.toml. A board is an MQTT client of its own account that sends
real encoded messages: a job (its own keys: HMAC of its own secret; its own mixed, label-randomised
targets), then the activation batches the server asks for, and waits for the adapter, resending
its job after ``round_timeout`` of silence as the agent does. The activations come from one real
backbone run over S review snippets (cached under ~/.cache/sidetune/features), reused by every
board with noise of its own, so no backbone runs per board. Boards run in a few processes of
their own.

Reported (JSON with exactly the fields of RESULT_FIELDS, and a table):

* ``jobs_completed`` / ``jobs_failed``: boards whose adapter arrived / whose job failed or never
  finished;
* ``samples_lost``: samples a board sent whose key the server neither holds in its cache nor
  trained on (a job the server closed as done with all its samples was trained on every one);
* ``ingest_samples_per_s``: samples cached (each board's last progress before training says all
  of them) over the seconds from the start until the last board's were;
* ``time_to_adapter_s``: per board, from its job to its adapter: p50, p99, max;
* ``worker_rss_mb_max``, ``broker_rss_mb_max``: peak RSS (VmHWM) of the largest worker, of mosquitto;
* ``redis_used_mb``: Redis's used_memory at the end (summed over a cluster's masters).

The table adds jobs per minute, bytes and messages per board round, and the CPU seconds of every
process group (boards, broker, Redis, workers) over the run.
"""

from __future__ import annotations

import getpass
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from schemas.errors import UnavailableError, UsageError

RESULT_FIELDS = ("boards", "samples", "workers", "cluster", "jobs_completed", "jobs_failed", "samples_lost",
                 "ingest_samples_per_s", "time_to_adapter_s", "worker_rss_mb_max", "redis_used_mb",
                 "broker_rss_mb_max")
#: Board settings as the agent's defaults (edge_agent/config.py).
UPLOAD_BATCH = 64
OUT_DIM = 8
NOISE_STD = 0.1
LABEL_EPSILON = 2.0
ROUND_TIMEOUT = 120.0
MAX_LENGTH = 128
#: Each board's activations: the backbone's, plus noise of this size relative to their spread.
BOARD_NOISE = 0.02
TICKS = os.sysconf("SC_CLK_TCK")

Progress = Callable[[str], None]


# --------------------------------------------------------------------------- the backbone's activations


@dataclass
class Features:
    backbone: str  # which backbone, for the report
    fingerprint: str
    pivot: str
    num_layers: int
    hidden: int
    token_ids: list[list[int]]
    states: np.ndarray  # float16 (S, L+1, d)
    prior: np.ndarray  # float32 (S, C)
    labels: np.ndarray  # int64 (S,)


def _tiny_backbone(progress: Progress) -> Path:
    """A tiny llama built from a config (tests/tiny_models.py, in a source checkout), exported once."""
    from sidetune.demo import default_home

    out = default_home() / "backbones" / "tiny-llama-fleet"
    if (out / "manifest.json").exists():
        return out
    try:
        from tests.tiny_models import make_tiny_llama
    except ImportError:
        raise UsageError("no exported backbone: run `sidetune demo` once (it exports SmolLM2-135M), or pass "
                         "--backbone DIR") from None
    from backbone_export import export_backbone

    progress(f"no exported SmolLM2: building a tiny llama from a config into {out}")
    with tempfile.TemporaryDirectory() as tmp:
        export_backbone(make_tiny_llama(Path(tmp) / "tiny"), out, progress=lambda _m: None)
    return out


def backbone_features(backbone_dir: Path | None, samples: int, progress: Progress) -> Features:
    """One real run of the backbone over ``samples`` snippets (the demo's prompt), cached on disk."""
    from edge_agent.backbone import Backbone
    from edge_agent.features import FeatureExtractor
    from edge_agent.task import TaskSpec
    from sidetune.data import CLASSES, DataError, load_reviews
    from sidetune.demo import TASK, default_backbone_dir, default_home

    if backbone_dir is None:
        backbone_dir = default_backbone_dir()
        if not (backbone_dir / "manifest.json").exists():
            backbone_dir = _tiny_backbone(progress)
    if not (backbone_dir / "manifest.json").exists():
        raise UsageError(f"{backbone_dir} holds no exported backbone")
    bb = Backbone.load(backbone_dir, threads=2)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "task.toml").write_text(TASK)
        task = TaskSpec.from_toml(Path(tmp) / "task.toml")
    name = f"{backbone_dir.name} ({bb.num_layers} layers, width {bb.hidden_size})"
    cache = default_home() / "features" / f"fleet-{bb.fingerprint[:16]}-{samples}.npz"
    if cache.exists():
        z = np.load(cache)
        ids = [list(map(int, row[row >= 0])) for row in z["ids"]]
        progress(f"backbone {name}: activations of {samples} samples from {cache}")
        return Features(name, bb.fingerprint, bb.pivot, bb.num_layers, bb.hidden_size, ids, z["states"],
                        z["prior"], z["labels"])
    try:
        reviews = load_reviews()
    except DataError:
        reviews = []
    rng = np.random.default_rng(0)
    if len(reviews) >= samples:
        picked = [reviews[i] for i in rng.choice(len(reviews), samples, replace=False)]
        texts, labels = [r.text for r in picked], [CLASSES.index(r.label) for r in picked]
    else:  # no data package: plain sentences
        words = "the movie film story acting was great good bad boring fun dull charming".split()
        texts = [" ".join(rng.choice(words, 12)) for _ in range(samples)]
        labels = [int(x) for x in rng.integers(0, 2, samples)]
    progress(f"backbone {name}: running it once over {samples} samples (the boards reuse them)")
    fx = FeatureExtractor(bb, task, MAX_LENGTH, 8)
    f = fx.extract(texts)
    states = f.states.astype(np.float16)
    width = max(len(t) for t in f.token_ids)
    table = np.full((samples, width), -1, np.int64)
    for i, t in enumerate(f.token_ids):
        table[i, : len(t)] = t
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cache.with_suffix(".part.npz")
    np.savez(tmp_path, ids=table, states=states, prior=f.prior, labels=np.array(labels))
    tmp_path.replace(cache)
    return Features(name, bb.fingerprint, bb.pivot, bb.num_layers, bb.hidden_size, f.token_ids, states, f.prior,
                    np.array(labels))


# --------------------------------------------------------------------------- simulated boards (own processes)


@dataclass
class BoardPlan:
    device: str
    password: str


@dataclass
class BoardsJob:
    """What one board process runs (picklable: it crosses to a spawned process)."""

    boards: list[BoardPlan]
    features: str  # the .npz of the backbone's activations
    fingerprint: str
    pivot: str
    samples: int
    port: int
    ca_file: str
    seed: int
    hyper: dict[str, Any]
    round_timeout: float = ROUND_TIMEOUT


class _Board:
    """One board: its secret, keys, job and batches, and its MQTT client."""

    def __init__(self, plan: BoardPlan, job: BoardsJob, states: np.ndarray, prior: np.ndarray, labels: np.ndarray,
                 ids: list[list[int]], rng: np.random.Generator, events: Any) -> None:
        from edge_agent.features import default_taps
        from edge_agent.keys import sample_key
        from edge_agent.label_dp import randomize
        from edge_agent.secret import DeviceSecret
        from schemas import HyperParams, Job, SideNetSpec, WireTensor, encode

        self.device = plan.device
        self.events = events
        secret = DeviceSecret.generate(OUT_DIM, rng)
        self.keys = [sample_key(secret.key, job.fingerprint, job.pivot, t) for t in ids]
        spread = float(np.std(states[: min(16, len(states))].astype(np.float32)))
        noise = rng.normal(0.0, BOARD_NOISE * spread, size=states.shape).astype(np.float16)
        own = (states + noise).astype("<f2")
        self.rows = {k: own[i].tobytes() for i, k in enumerate(self.keys)}
        self.shape = states.shape[1:]
        sent = randomize(labels, prior.shape[1], LABEL_EPSILON, rng)
        targets = secret.targets(sent, prior, NOISE_STD, rng)
        layers = states.shape[1] - 1
        spec = SideNetSpec(num_states=states.shape[1], width=states.shape[2], taps=tuple(default_taps(layers)),
                           out_dim=OUT_DIM)
        self.job = Job(device_id=self.device, job_id=f"r1-{uuid.uuid4().hex[:8]}", backbone_fingerprint=job.fingerprint,
                       spec=spec, hyper=HyperParams(**job.hyper), keys=tuple(self.keys),
                       targets=WireTensor.from_array(targets, "float32"))
        self.job_msg = encode(self.job)
        events.put(("job", self.device, time.time(), self.job.job_id, self.keys))
        self.fingerprint = job.fingerprint
        self.batches = {tuple(self.keys[i : i + UPLOAD_BATCH]): self._batch(self.keys[i : i + UPLOAD_BATCH])
                        for i in range(0, len(self.keys), UPLOAD_BATCH)}
        self.bytes_up = 0
        self.messages_up = 0
        self.last_heard = 0.0
        self.uploaded: dict[str, float] = {}
        self.cached = 0
        self.finished = False
        self.client: Any = None

    def _batch(self, keys: list[str]) -> tuple[str, bytes]:
        from schemas import ActivationBatch, WireTensor, encode

        states = WireTensor(dtype="float16", shape=(len(keys), *self.shape), data=b"".join(self.rows[k] for k in keys))
        return encode(ActivationBatch(device_id=self.device, job_id=self.job.job_id,
                                      backbone_fingerprint=self.fingerprint, keys=tuple(keys), states=states))

    def publish(self, topic_payload: tuple[str, bytes]) -> None:
        t, payload = topic_payload
        self.client.publish(t, payload, qos=1)
        self.bytes_up += len(payload)
        self.messages_up += 1

    def send_job(self) -> None:
        self.last_heard = time.time()
        self.uploaded.clear()  # as the agent: whatever the server still lacks is sent again
        self.publish(self.job_msg)

    def upload(self, missing: list[str], now: float) -> None:
        """As the agent: the keys asked for, but none sent within RESEND_AFTER (still in flight)."""
        from edge_agent.rounds import RESEND_AFTER

        want = {k for k in missing if now - self.uploaded.get(k, 0.0) > RESEND_AFTER}
        for k in want:
            self.uploaded[k] = now
        for keys, msg in self.batches.items():
            if want.issuperset(keys):
                self.publish(msg)
                want.difference_update(keys)
        rest = [k for k in self.keys if k in want]
        for i in range(0, len(rest), UPLOAD_BATCH):
            self.publish(self._batch(rest[i : i + UPLOAD_BATCH]))

    def handle(self, msg: Any) -> None:
        from schemas import AdapterUpdate, CacheReport
        from schemas import Progress as ProgressMsg
        from schemas.status import Rejection

        if self.finished or getattr(msg, "job_id", self.job.job_id) != self.job.job_id:
            return
        now = time.time()
        self.last_heard = now
        if isinstance(msg, CacheReport):
            if msg.missing:
                self.upload(list(msg.missing), now)
            elif msg.total == len(self.keys):
                self._cached(len(self.keys), now)
        elif isinstance(msg, ProgressMsg):
            if msg.state == "failed":
                self._end("failed", now, msg.detail)
            elif msg.state in ("training", "done"):
                self._cached(len(self.keys), now)
            else:
                self._cached(min(msg.samples_cached, len(self.keys)), now)
        elif isinstance(msg, AdapterUpdate):
            self._cached(len(self.keys), now)
            self._end("done", now, f"adapter v{msg.version}")
        elif isinstance(msg, Rejection):
            if msg.ref_msg_id == self.job.msg_id and msg.code not in ("quota_rate", "quota_jobs", "server_full"):
                self._end("failed", now, f"job rejected: {msg.code}: {msg.reason}")

    def _cached(self, n: int, now: float) -> None:
        if n > self.cached:
            self.cached = n
            self.events.put(("cached", self.device, now, n))

    def _end(self, state: str, now: float, detail: str) -> None:
        self.finished = True
        self.events.put((state, self.device, now, detail, self.bytes_up, self.messages_up))


def _boards_main(job: BoardsJob, events: Any, go: Any, stop: Any) -> None:
    """A board process: prepare every board's messages, connect them, then run their rounds."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from schemas import decode, topic

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    z = np.load(job.features)
    ids = [list(map(int, row[row >= 0])) for row in z["ids"]][: job.samples]
    states, prior, labels = z["states"][: job.samples], z["prior"][: job.samples], z["labels"][: job.samples]
    rng = np.random.default_rng(job.seed)
    inbox: queue.Queue[tuple[_Board, Any]] = queue.Queue()
    boards = [_Board(p, job, states, prior, labels, ids, rng, events) for p in job.boards]
    connected = threading.Semaphore(0)
    for b in boards:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=b.device, protocol=mqtt.MQTTv5)
        c.username_pw_set(b.device, next(p.password for p in job.boards if p.device == b.device))
        c.tls_set(ca_certs=job.ca_file)
        c.max_inflight_messages_set(32)
        c.max_queued_messages_set(0)
        filters = [(topic(b.device, k), 1) for k in ("cache", "progress", "adapter", "errors")]

        def on_connect(cl: Any, _u: Any, _f: Any, rc: Any, _p: Any, filters: Any = filters) -> None:
            if not rc.is_failure:
                cl.subscribe(filters)

        def on_subscribe(_c: Any, _u: Any, _m: Any, _r: Any, _p: Any) -> None:
            connected.release()

        def on_message(_c: Any, _u: Any, m: Any, board: _Board = b) -> None:
            if m.retain or not m.payload:
                return
            try:
                inbox.put((board, decode(m.topic, m.payload)))
            except Exception:  # a malformed downlink is the server's bug: counted as a failure
                events.put(("failed", board.device, time.time(), f"undecodable downlink on {m.topic}", 0, 0))

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        c.connect_async("127.0.0.1", job.port, keepalive=60, clean_start=True)
        c.loop_start()
        b.client = c
    for _ in boards:
        if not connected.acquire(timeout=120):
            events.put(("error", "", time.time(), "a board could not connect and subscribe within 120 s"))
            return
    events.put(("ready", "", time.time(), len(boards)))
    go.wait()
    for b in boards:
        b.send_job()
    while not stop.is_set() and not all(b.finished for b in boards):
        try:
            board, msg = inbox.get(timeout=0.5)
            board.handle(msg)
        except queue.Empty:
            pass
        now = time.time()
        for b in boards:
            if not b.finished and now - b.last_heard > job.round_timeout:
                b.send_job()  # as the agent does after round_timeout of silence
    for b in boards:
        b.client.disconnect()
        b.client.loop_stop()


# --------------------------------------------------------------------------- the services


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rpartition(")")[2].split()
        return (int(parts[11]) + int(parts[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def _peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise UnavailableError(f"{what} exited with code {proc.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise UnavailableError(f"{what} is not listening on {port} after {timeout:.0f} s")


@dataclass
class Services:
    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    mosquitto: subprocess.Popen[bytes] | None = None
    redis: subprocess.Popen[bytes] | None = None
    cluster: Any = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_logs: list[Path] = field(default_factory=list)

    def redis_pids(self) -> list[int]:
        if self.cluster is not None:
            return list(self.cluster.pids())
        return [self.redis.pid] if self.redis is not None else []

    def stop(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.workers:
            try:
                p.wait(40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for q in (self.mosquitto, self.redis):
            if q is not None and q.poll() is None:
                q.terminate()
                try:
                    q.wait(20)
                except subprocess.TimeoutExpired:
                    q.kill()
                    q.wait()
        if self.cluster is not None:
            self.cluster.stop()


def _start_services(root: Path, boards: int, workers: int, cluster: bool, progress: Progress) -> tuple[Services, dict[str, str], Path, int, str]:
    """Broker folder (init + one account per board), mosquitto, Redis (or a cluster), W workers.
    Returns (services, board passwords, the CA file, the boards' TLS port, the Redis URL)."""
    from sidetune.provision import BrokerParams, add_device, init_broker
    from sidetune.services import find_binary, free_port

    broker = root / "broker"
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    tls_port, plain_port, redis_port = sorted(ports)
    progress(f"broker folder {broker}: `sidetune broker init` and {boards} × `add-device`")
    init_broker(broker, BrokerParams(hostnames=[], tls_port=tls_port, plain_port=plain_port, bind="127.0.0.1",
                                     user=getpass.getuser(), redis_port=redis_port))
    passwords = {}
    for i in range(boards):
        dev = f"board-{i:03d}"
        bundle = add_device(broker, dev, broker_host="127.0.0.1")
        passwords[dev] = (bundle / "edge.password").read_text().strip()
    s = Services(root)
    log = broker / "state" / "mosquitto.log"
    s.mosquitto = subprocess.Popen([find_binary("mosquitto", "mosquitto"), "-c", str(broker / "mosquitto.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(tls_port, s.mosquitto, "mosquitto", log)
    _wait_port(plain_port, s.mosquitto, "mosquitto", log)
    redis_pw = (broker / "redis.password").read_text().strip()
    if cluster:
        from sidetune.redis_cluster import LocalRedisCluster

        progress("Redis Cluster: 3 masters + 3 replicas (redis-cli --cluster create)")
        s.cluster = LocalRedisCluster(root / "redis-cluster", password=redis_pw).start()
        redis_url = s.cluster.url
    else:
        (root / "redis").mkdir()
        s.redis = subprocess.Popen([find_binary("redis-server", "redis-server"), str(broker / "redis.conf"),
                                    "--dir", str(root / "redis"), "--logfile", str(root / "redis" / "redis.log")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(redis_port, s.redis, "redis-server", root / "redis" / "redis.log")
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
    base = (broker / "server.toml").read_text()
    for w in range(workers):
        conf = root / f"server-{w + 1}.toml"
        text = base.replace(f'redis_url = "redis://127.0.0.1:{redis_port}/0"', f"redis_url = {json.dumps(redis_url)}")
        conf.write_text(text + f'worker_id = "fleet-w{w + 1}"\ntorch_threads = 1\n')
        wlog = root / f"server-{w + 1}.log"
        out = open(wlog, "wb")  # noqa: SIM115 (the child keeps it)
        s.workers.append(subprocess.Popen([sys.executable, "-m", "sidetune.cli", "server", "--config", str(conf)],
                                          stdout=out, stderr=subprocess.STDOUT))
        out.close()
        s.worker_logs.append(wlog)
    deadline = time.monotonic() + 120
    for p, wlog in zip(s.workers, s.worker_logs):
        while "up: broker" not in wlog.read_text(errors="replace"):
            if p.poll() is not None or time.monotonic() > deadline:
                s.stop()
                raise UnavailableError(f"worker {wlog.name} did not start: {wlog.read_text(errors='replace')[-1500:]}")
            time.sleep(0.2)
    time.sleep(1.0)  # each worker subscribes in its connect callback: let the SUBACKs arrive
    progress(f"{workers} `sidetune server` worker(s) up, mosquitto (TLS :{tls_port} for boards), "
             f"{'a Redis Cluster' if cluster else 'redis-server'}")
    return s, passwords, broker / "ca.crt", tls_port, redis_url


# --------------------------------------------------------------------------- the run


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    ys = sorted(xs)
    k = max(0, min(len(ys) - 1, math.ceil(q / 100 * len(ys)) - 1))
    return ys[k]


def run_fleet_bench(boards: int, samples: int, workers: int, cluster: bool, json_path: Path | None = None,
                    backbone_dir: Path | None = None, board_procs: int | None = None, timeout: float = 3600.0,
                    progress: Progress = print) -> dict[str, Any]:
    if boards < 1 or samples < 1 or workers < 1:
        raise UsageError("--boards, --samples and --workers must be positive")
    feats = backbone_features(backbone_dir, samples, progress)
    per_sample = int(np.prod(feats.states.shape[1:])) * 2
    progress(f"{boards} boards × {samples} samples, {per_sample / 1000:.1f} kB of fp16 activations per sample; "
             f"{workers} worker(s){', Redis Cluster' if cluster else ''}")
    root = Path(tempfile.mkdtemp(prefix="sidetune-fleet-"))
    services: Services | None = None
    procs: list[Any] = []
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    try:
        from sidetune.demo import default_home

        npz = default_home() / "features" / f"fleet-{feats.fingerprint[:16]}-{samples}.npz"
        services, passwords, ca, port, redis_url = _start_services(root, boards, workers, cluster, progress)
        from schemas.spec import HyperParams

        hyper = HyperParams().model_dump()
        nproc = board_procs or max(1, min(4, boards // 10 or 1))
        devices = sorted(passwords)
        events = ctx.Queue()
        go = ctx.Event()
        for i in range(nproc):
            plans = [BoardPlan(d, passwords[d]) for d in devices[i::nproc]]
            if not plans:
                continue
            job = BoardsJob(plans, str(npz), feats.fingerprint, feats.pivot, samples, port, str(ca), seed=1000 + i,
                            hyper=hyper)
            p = ctx.Process(target=_boards_main, args=(job, events, go, stop), name=f"boards-{i}", daemon=True)
            p.start()
            procs.append(p)
        progress(f"preparing {boards} boards' messages in {len(procs)} processes and connecting them (TLS)")
        ready = 0
        jobs: dict[str, tuple[str, list[str]]] = {}
        while ready < len(procs):
            try:
                ev = events.get(timeout=300)
            except queue.Empty:
                raise UnavailableError("the simulated boards did not get ready in 300 s") from None
            if ev[0] == "error":
                raise UnavailableError(ev[3])
            if ev[0] == "ready":
                ready += 1
            elif ev[0] == "job":
                jobs[ev[1]] = (ev[3], ev[4])
        pids = {"boards": [p.pid for p in procs], "broker": [services.mosquitto.pid] if services.mosquitto else [],
                "redis": services.redis_pids(), "workers": [w.pid for w in services.workers],
                "bench": [os.getpid()]}
        cpu0 = {k: sum(_cpu_seconds(p) for p in v) for k, v in pids.items()}
        t0 = time.time()
        go.set()
        progress("go: every board sends its job")
        cached_at: dict[str, float] = {}
        cached_n: dict[str, int] = {}
        cpu_ingest: dict[str, float] | None = None
        ended: dict[str, tuple[str, float, str, int, int]] = {}
        next_note = time.monotonic() + 2.0
        deadline = time.monotonic() + timeout
        while len(ended) < boards and time.monotonic() < deadline:
            try:
                ev = events.get(timeout=0.5)
            except queue.Empty:
                ev = None
            if ev is not None:
                kind, dev, at = ev[0], ev[1], ev[2]
                if kind == "cached":
                    cached_n[dev] = max(cached_n.get(dev, 0), ev[3])
                    if ev[3] >= samples:
                        cached_at.setdefault(dev, at)
                        if len(cached_at) == boards and cpu_ingest is None:  # where the CPU went while ingesting
                            cpu_ingest = {k: sum(_cpu_seconds(p) for p in v) - cpu0[k] for k, v in pids.items()}
                elif kind in ("done", "failed"):
                    ended.setdefault(dev, (kind, at, ev[3], ev[4], ev[5]))
            dead = [w for w in services.workers if w.poll() is not None]
            if dead:
                raise UnavailableError(f"a worker exited with code {dead[0].returncode}: see "
                                       f"{services.worker_logs[services.workers.index(dead[0])]}")
            if time.monotonic() >= next_note:
                next_note = time.monotonic() + 2.0
                done = sum(1 for e in ended.values() if e[0] == "done")
                progress(f"{time.time() - t0:6.1f} s: samples cached {sum(cached_n.values())}/{boards * samples}, "
                         f"adapters {done}/{boards}, failed {len(ended) - done}")
        t_end = time.time()
        done = sum(1 for e in ended.values() if e[0] == "done")
        progress(f"{t_end - t0:6.1f} s: samples cached {sum(cached_n.values())}/{boards * samples}, "
                 f"adapters {done}/{boards}, failed {len(ended) - done}: the end")
        cpu = {k: sum(_cpu_seconds(p) for p in v) - cpu0[k] for k, v in pids.items()}
        worker_rss = max((_peak_rss_mb(w.pid) for w in services.workers), default=0.0)
        broker_rss = _peak_rss_mb(services.mosquitto.pid) if services.mosquitto else 0.0
        stop.set()
        # what the server holds: every sent key cached, or trained on by a job closed as done
        from side_server.config import ServerSettings
        from side_server.redis_client import connect

        settings = ServerSettings(redis_url=redis_url, redis_password_file=root / "broker" / "redis.password")
        r = connect(settings)
        lost = _samples_lost(r, jobs)
        if services.cluster is not None:
            used = services.cluster.used_memory()
        else:
            used = int(r.info("memory")["used_memory"])
        r.close()
        completed = sum(1 for e in ended.values() if e[0] == "done")
        ttas = [e[1] - t0 for e in ended.values() if e[0] == "done"]
        ingest_s = (max(cached_at.values()) - t0) if cached_at else float("nan")
        result: dict[str, Any] = {
            "boards": boards, "samples": samples, "workers": workers, "cluster": cluster,
            "jobs_completed": completed, "jobs_failed": boards - completed,
            "samples_lost": lost,
            "ingest_samples_per_s": round(len(cached_at) * samples / ingest_s, 1) if cached_at else 0.0,
            "time_to_adapter_s": {"p50": round(_percentile(ttas, 50), 2), "p99": round(_percentile(ttas, 99), 2),
                                  "max": round(max(ttas, default=0.0), 2)},
            "worker_rss_mb_max": round(worker_rss, 1),
            "redis_used_mb": round(used / 2**20, 1),
            "broker_rss_mb_max": round(broker_rss, 1),
        }
        assert tuple(result) == RESULT_FIELDS
        failures = sorted({e[2][:200] for e in ended.values() if e[0] == "failed"})
        up = [e[3] for e in ended.values() if e[0] == "done"]
        msgs = [e[4] for e in ended.values() if e[0] == "done"]
        _print_table(result, feats, per_sample, t_end - t0, ingest_s, cpu, cpu_ingest, len(procs),
                     sum(up) / len(up) if up else 0.0, sum(msgs) / len(msgs) if msgs else 0.0, failures)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=2) + "\n")
            progress(f"wrote {json_path}")
        return result
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        if services is not None:
            services.stop()
        shutil.rmtree(root, ignore_errors=True)


def _samples_lost(r: Any, jobs: dict[str, tuple[str, list[str]]]) -> int:
    """Samples each board sent (its job's keys) that the server neither caches nor trained on: a
    job the store closed as done with all its samples was trained on every one of them."""
    from side_server.cache import ActivationCache
    from side_server.store import JobStore

    store, cache = JobStore(r), ActivationCache(r, ttl=1)
    lost = 0
    for dev, (job_id, keys) in jobs.items():
        rec = store.get(dev, job_id)
        if rec is not None and rec.state == "done" and rec.samples == len(keys):
            continue
        lost += len(cache.missing(dev, keys))
    return lost


def _print_table(res: dict[str, Any], feats: Features, per_sample: int, seconds: float, ingest_s: float,
                 cpu: dict[str, float], cpu_ingest: dict[str, float] | None, nproc: int, bytes_up: float,
                 msgs_up: float, failures: list[str]) -> None:
    tta = res["time_to_adapter_s"]
    jobs_min = res["jobs_completed"] / (seconds / 60) if seconds > 0 else 0.0
    rows = [
        ("backbone", feats.backbone),
        ("boards × samples", f"{res['boards']} × {res['samples']} ({per_sample / 1000:.1f} kB per sample)"),
        ("workers", f"{res['workers']}{' on a Redis Cluster (3 masters + 3 replicas)' if res['cluster'] else ''}"),
        ("jobs completed / failed", f"{res['jobs_completed']} / {res['jobs_failed']}"),
        ("samples lost", str(res["samples_lost"])),
        ("ingest", f"{res['ingest_samples_per_s']:.0f} samples/s (all cached after {ingest_s:.1f} s)"),
        ("jobs per minute", f"{jobs_min:.1f} (all done after {seconds:.1f} s)"),
        ("time to adapter", f"p50 {tta['p50']:.1f} s, p99 {tta['p99']:.1f} s, max {tta['max']:.1f} s"),
        ("per board round", f"{bytes_up / 1e6:.2f} MB in {msgs_up:.0f} messages up"),
        ("worker RSS (max)", f"{res['worker_rss_mb_max']:.0f} MB"),
        ("redis used", f"{res['redis_used_mb']:.0f} MB "
                       f"({res['redis_used_mb'] * 2**20 / max(1, res['boards']) / 1e6:.1f} MB per board)"),
        ("broker RSS (max)", f"{res['broker_rss_mb_max']:.0f} MB"),
    ]
    total = sum(cpu.values()) or 1.0
    for k, label in (("workers", "CPU: workers"), ("boards", f"CPU: boards ({nproc} processes)"),
                     ("broker", "CPU: mosquitto"), ("redis", "CPU: redis"), ("bench", "CPU: this process")):
        extra = f", {cpu[k] / max(1, res['boards']):.2f} s per board round" if k == "workers" else ""
        rows.append((label, f"{cpu[k]:.1f} s ({100 * cpu[k] / total:.0f} %){extra}"))
    if cpu_ingest is not None:
        n = res["boards"] * res["samples"]
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in cpu_ingest.items())
        rows.append(("CPU until all cached", parts))
        rows.append(("", f"workers: {n / max(cpu_ingest['workers'], 1e-9):.0f} samples per CPU-second "
                         "(training of the jobs ready by then included)"))
    rows.append(("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    for f in failures[:5]:
        print(f"  failure: {f}")
    print()
