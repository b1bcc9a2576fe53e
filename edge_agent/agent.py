"""The board's daemon: inbox → forward passes (once per sample) → job → uploads → adapter.

One main thread runs the round state machine; paho's thread only decodes and
queues incoming messages; the outbox thread sends what the ledger holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from edge_agent import adapter as adapters
from edge_agent.backbone import Backbone
from edge_agent.config import EdgeSettings
from edge_agent.evaluate import Holdout, load_holdout
from edge_agent.features import FeatureExtractor, default_taps
from edge_agent.inbox import finish_file, parse_jsonl, pending_files
from edge_agent.keys import sample_key
from edge_agent.ledger import Ledger
from edge_agent.outbox import OutboxSender
from edge_agent.secret import DeviceSecret, load_or_create
from edge_agent.systemd import notify
from edge_agent.task import TaskSpec
from schemas.activations import ActivationBatch
from schemas.adapter import AdapterUpdate
from schemas.base import Message
from schemas.errors import SidetuneError, SpecMismatch, WireError
from schemas.jobs import CacheReport, Job
from schemas.progress import Progress
from schemas.spec import SideNetSpec
from schemas.status import DeviceStatus, Rejection
from schemas.tensors import WireTensor
from schemas.topics import DOWNLINK_KINDS, topic
from schemas.transport import BrokerAddress, Incoming, Transport
from schemas.wire import decode, encode

log = logging.getLogger("sidetune.edge")


def _agent_version() -> str:
    try:
        return version("sidetune")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


__version__ = _agent_version()

TRAIN_REQUEST = "train.request"


@dataclass
class Round:
    number: int
    job: Job
    started: float
    last_heard: float
    uploaded: dict[str, float] = field(default_factory=dict)  # key -> when queued
    training: bool = False


class EdgeAgent:
    def __init__(self, settings: EdgeSettings, *, connect: bool = True) -> None:
        self.s = settings
        self.state_dir = Path(settings.state_dir)
        self.inbox = self.state_dir / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.task = TaskSpec.from_toml(settings.task_file)
        self.backbone = Backbone.load(settings.backbone_dir, threads=settings.threads)
        self.fx = FeatureExtractor(self.backbone, self.task, settings.max_length, settings.batch_size)
        self.secret: DeviceSecret = load_or_create(self.state_dir, settings.out_dim)
        taps = tuple(settings.taps) if settings.taps else tuple(default_taps(self.backbone.num_layers))
        self.spec = SideNetSpec(num_states=self.backbone.num_layers + 1, width=self.backbone.hidden_size, taps=taps,
                                bottleneck=settings.bottleneck, out_dim=settings.out_dim)
        if settings.out_dim <= self.task.num_classes:
            raise SidetuneError(f"out_dim ({settings.out_dim}) must exceed the number of classes "
                                f"({self.task.num_classes}) so the mixing can hide them")
        self.ledger = Ledger(self.state_dir / "state.db")
        self.adapter: adapters.InstalledAdapter | None = None
        try:
            self.adapter = adapters.load(self.state_dir, self.spec, self.backbone.fingerprint)
        except SpecMismatch as e:
            log.warning("%s; predicting with the backbone alone until a new adapter arrives", e)
        self.events: queue.Queue[tuple[Message, int]] = queue.Queue()
        self.round: Round | None = None
        self.stopping = threading.Event()
        self._holdout: Holdout | None = None
        self.transport: Transport | None = None
        self._reconnected = threading.Event()
        self.outbox: OutboxSender | None = None
        if connect:
            status_topic, offline = encode(self._status("offline"))
            self.transport = Transport(
                f"edge-{settings.device_id}",
                BrokerAddress(settings.broker_host, settings.broker_port, settings.device_id, settings.broker_password(),
                              settings.broker_ca_file),
                self._on_message,
                subscriptions=tuple(topic(settings.device_id, k) for k in DOWNLINK_KINDS),
                will=(status_topic, offline),
                on_connected=self._connected,
            )
            self.outbox = OutboxSender(self.ledger, self.transport, on_sent=self._count_up)

    # ------------------------------------------------------------ messages

    def _status(self, state: str) -> DeviceStatus:
        return DeviceStatus(device_id=self.s.device_id, state=state, agent_version=__version__,  # type: ignore[arg-type]
                            adapter_version=self.adapter.version if self.adapter else 0,
                            backbone_fingerprint=self.backbone.fingerprint)

    def _connected(self, first: bool) -> None:
        """paho's thread: after a reconnect, ask the server again where the round stands
        (what was published just before a broker restart may not have reached a worker)."""
        if not first:
            self._reconnected.set()

    def _on_message(self, item: Incoming) -> None:
        """paho's thread: decode and queue, nothing else."""
        try:
            msg = decode(item.topic, item.payload)
        except WireError as e:
            log.warning("dropped a bad message on %s: %s", item.topic, e)
            return
        self.events.put((msg, len(item.payload)))

    def _count_up(self, rnd: int | None, nbytes: int) -> None:
        if rnd is not None:
            self.ledger.add_round_counts(rnd, bytes_up=nbytes)

    def _send(self, msg: Message, rnd: int | None) -> None:
        t, payload = encode(msg)
        self.ledger.enqueue([(t, payload, False)], rnd)
        if self.outbox:
            self.outbox.kick()

    # ------------------------------------------------------------ daemon

    def run(self) -> None:
        assert self.transport is not None and self.outbox is not None
        self.transport.start()
        t, payload = encode(self._status("online"))
        self.transport.publish(t, payload, retain=True)
        self.outbox.start()
        self._resume_round()
        notify("READY=1")
        log.info("edge agent %s up: backbone %s, %d pending outbox messages", self.s.device_id,
                 self.backbone.fingerprint[:12], self.outbox.pending())
        last_watchdog = 0.0
        while not self.stopping.is_set():
            self.step()
            if time.monotonic() - last_watchdog > 5:
                notify("WATCHDOG=1")
                last_watchdog = time.monotonic()
        notify("STOPPING=1")
        t, payload = encode(self._status("offline"))
        self.transport.publish(t, payload, retain=True)
        self.outbox.stop()
        time.sleep(0.2)
        self.transport.stop()
        self.ledger.close()

    def step(self, wait: float = 0.2) -> None:
        """One turn of the main loop (also used by tests)."""
        self.ingest_inbox()
        try:
            msg, nbytes = self.events.get(timeout=wait)
            self.handle(msg, nbytes)
        except queue.Empty:
            pass
        if self._reconnected.is_set():
            self._reconnected.clear()
            if self.round is not None:
                log.info("round %d: reconnected; asking the server where the round stands", self.round.number)
                self._resend_job()
        if self.round is None:
            self._maybe_start_round()
        elif time.time() - self.round.last_heard > self.s.round_timeout:
            log.warning("round %d: nothing heard for %.0f s; sending the job again", self.round.number,
                        self.s.round_timeout)
            self._resend_job()

    # ------------------------------------------------------------ inbox

    def ingest_inbox(self) -> int:
        added = 0
        for path in pending_files(self.inbox):
            parsed = parse_jsonl(path, self.task.classes)
            errors = list(parsed.errors)
            rows = []
            if parsed.good:
                ids = self.fx.token_ids([t for t, _ in parsed.good])
                for (_, label), tok in zip(parsed.good, ids):
                    key = sample_key(self.secret.key, self.backbone.fingerprint, self.backbone.pivot, tok)
                    rows.append((key, self.task.label_index(label), tok))
            new = self.ledger.add_samples(rows)
            finish_file(self.inbox, path, errors)
            added += new
            log.info("inbox: %s: %d samples (%d new, %d duplicates), %d bad lines skipped", path.name,
                     len(rows), new, len(rows) - new, len(errors))
        return added

    # ------------------------------------------------------------ rounds

    def _maybe_start_round(self) -> None:
        request = self.state_dir / TRAIN_REQUEST
        asked = request.exists()
        if asked:
            request.unlink(missing_ok=True)
        n_new = self.ledger.count_new()
        if n_new and (asked or n_new >= self.s.min_new_samples):
            self.start_round()
        elif asked:
            log.info("train requested, but no new samples wait")

    def start_round(self) -> int | None:
        t0 = time.time()
        fresh = self.ledger.samples("round IS NULL AND prior IS NULL")
        passes = 0
        chunk = 64
        for i in range(0, len(fresh), chunk):
            if self.stopping.is_set():  # SIGTERM: what was computed is kept, the round starts next time
                log.info("stopping during forward passes (%d/%d kept)", passes, len(fresh))
                return None
            part = fresh[i : i + chunk]
            f = self.fx.from_token_ids([s.token_ids for s in part])
            self.ledger.set_features([(s.key, f.prior[j], f.states[j]) for j, s in enumerate(part)])
            passes += len(part)
            self.ledger.set_meta("activity", f"forward passes {passes}/{len(fresh)}")
            log.info("forward passes: %d/%d", passes, len(fresh))
        everything = self.ledger.samples("prior IS NOT NULL")
        n_new = self.ledger.count_new()  # every new sample has its prior by now
        labels = np.array([s.label for s in everything])
        prior = np.stack([s.prior for s in everything if s.prior is not None])
        rng = np.random.default_rng(int.from_bytes(uuid.uuid4().bytes[:8], "little"))
        targets = self.secret.targets(labels, prior, self.s.noise_std, rng)
        rnd = self.ledger.new_round("pending", len(everything), n_new)
        job = Job(device_id=self.s.device_id, job_id=f"r{rnd}-{uuid.uuid4().hex[:8]}",
                  backbone_fingerprint=self.backbone.fingerprint, spec=self.spec, hyper=self.s.hyper,
                  base_adapter_version=self.adapter.version if self.adapter else 0,
                  keys=tuple(s.key for s in everything), targets=WireTensor.from_array(targets, "float32"))
        t, payload = encode(job)
        self.ledger.update_round(rnd, job_id=job.job_id, state="sent", forward_passes=passes, job_payload=payload,
                                 started=t0)
        self.ledger.enqueue([(t, payload, False)], rnd)
        if self.outbox:
            self.outbox.kick()
        self.round = Round(rnd, job, t0, time.time())
        log.info("round %d: job %s with %d samples (%d new, %d forward passes)", rnd, job.job_id,
                 len(everything), n_new, passes)
        return rnd

    def _resume_round(self) -> None:
        row = self.ledger.open_round()
        if row is None:
            return
        if row["state"] == "preparing" or not row.get("job_payload"):
            self.ledger.update_round(int(row["round"]), state="failed", detail="agent stopped before the job was sent")
            return
        job = decode(topic(self.s.device_id, "jobs"), row["job_payload"])
        assert isinstance(job, Job)
        self.round = Round(int(row["round"]), job, float(row["started"] or time.time()), time.time())
        log.info("resuming round %d (job %s); asking the server where it stands", self.round.number, job.job_id)
        self._resend_job()

    def _resend_job(self) -> None:
        """Same job, same content: the server answers again what it lacks (or that it is done)."""
        assert self.round is not None
        t, payload = encode(self.round.job)
        self.ledger.enqueue([(t, payload, False)], self.round.number)
        self.round.last_heard = time.time()
        self.round.uploaded.clear()  # whatever the server still lacks is sent again
        if self.outbox:
            self.outbox.kick()

    # ------------------------------------------------------------ server messages

    def handle(self, msg: Message, nbytes: int) -> None:
        if isinstance(msg, AdapterUpdate) and (self.round is None or msg.job_id != self.round.job.job_id):
            self._maybe_install_retained(msg)
            return
        r = self.round
        job_id = getattr(msg, "job_id", None)
        if r is None or (job_id is not None and job_id != r.job.job_id):
            if isinstance(msg, Rejection):
                log.warning("server rejected %s: %s", msg.ref_topic, msg.reason)
            return
        self.ledger.add_round_counts(r.number, bytes_down=nbytes)
        r.last_heard = time.time()
        if isinstance(msg, CacheReport):
            self._upload(r, list(msg.missing))
        elif isinstance(msg, Progress):
            if msg.state == "training":
                if not r.training:
                    self.ledger.update_round(r.number, state="training")
                    r.training = True
                log.info("round %d: epoch %d/%d train loss %.4f val loss %s", r.number, msg.epoch, msg.epochs,
                         msg.train_loss or 0.0, f"{msg.val_loss:.4f}" if msg.val_loss is not None else "-")
            elif msg.state == "failed":
                self._fail(r, f"server: {msg.detail}")
        elif isinstance(msg, Rejection):
            log.warning("round %d: server rejected %s: %s (%s)", r.number, msg.ref_topic, msg.reason, msg.code)
            if msg.ref_msg_id == r.job.msg_id and msg.code != "replayed":
                self._fail(r, f"job rejected: {msg.reason}")
        elif isinstance(msg, AdapterUpdate):
            self._finish(r, msg)

    def _upload(self, r: Round, missing: list[str]) -> None:
        now = time.time()
        todo = [k for k in missing if now - r.uploaded.get(k, 0.0) > 30.0]
        if not todo:
            return
        self.ledger.update_round(r.number, state="uploading")
        by_key = self.ledger.samples_by_key(todo)
        lost = [k for k in todo if k not in by_key]
        if lost:
            log.warning("round %d: server asks for %d keys this board does not know", r.number, len(lost))
        recompute = [by_key[k] for k in todo if k in by_key and by_key[k].states is None]
        if recompute:  # evicted from the server's cache after we dropped them: compute again
            f = self.fx.from_token_ids([s.token_ids for s in recompute])
            for j, s in enumerate(recompute):
                s.states = f.states[j].astype("<f2").tobytes()
            self.ledger.add_round_counts(r.number, forward_passes=len(recompute))
        keys = [k for k in todo if k in by_key]
        s_, d = self.spec.num_states, self.spec.width
        items = []
        for i in range(0, len(keys), self.s.upload_batch):
            part = keys[i : i + self.s.upload_batch]
            raw = b"".join(by_key[k].states or b"" for k in part)
            if self.s.wire_dtype == "float16":
                states = WireTensor(dtype="float16", shape=(len(part), s_, d), data=raw)
            else:
                arr = np.frombuffer(raw, "<f2").reshape(len(part), s_, d).astype(np.float32)
                states = WireTensor.from_array(arr, self.s.wire_dtype)  # type: ignore[arg-type]
            batch = ActivationBatch(device_id=self.s.device_id, job_id=r.job.job_id,
                                    backbone_fingerprint=self.backbone.fingerprint, keys=tuple(part), states=states)
            t, payload = encode(batch)
            items.append((t, payload, False))
            for k in part:
                r.uploaded[k] = now
        self.ledger.enqueue(items, r.number)
        if self.outbox:
            self.outbox.kick()
        log.info("round %d: uploading %d activations in %d messages", r.number, len(keys), len(items))

    def _finish(self, r: Round, update: AdapterUpdate) -> None:
        try:
            adapters.check_update(update, self.spec, self.backbone.fingerprint)
        except SpecMismatch as e:
            self._fail(r, str(e))
            return
        adapters.install(self.state_dir, update)
        self.adapter = adapters.load(self.state_dir, self.spec, self.backbone.fingerprint)
        self.ledger.assign_round(list(r.job.keys), r.number)
        fields: dict[str, object] = {"state": "done", "adapter_version": update.version, "finished": time.time(),
                                     "seconds": time.time() - r.started}
        holdout = self.holdout()
        if holdout is not None:
            fields["zero_shot_accuracy"] = holdout.accuracy(None, self.secret)
            fields["tuned_accuracy"] = holdout.accuracy(self.adapter, self.secret)
        self.ledger.update_round(r.number, **fields)
        log.info("round %d done: adapter v%d installed (%s)", r.number, update.version,
                 ", ".join(f"{k} {v:.3f}" for k, v in fields.items() if k.endswith("accuracy")))  # type: ignore[str-format]
        self.round = None
        self._send(self._status("online"), None)

    def _fail(self, r: Round, why: str) -> None:
        log.error("round %d failed: %s", r.number, why)
        self.ledger.update_round(r.number, state="failed", detail=why[:500], finished=time.time())
        self.round = None

    def _maybe_install_retained(self, update: AdapterUpdate) -> None:
        if self.adapter is not None and update.version <= self.adapter.version:
            return
        try:
            adapters.check_update(update, self.spec, self.backbone.fingerprint)
        except SpecMismatch as e:
            log.warning("ignoring adapter v%d: %s", update.version, e)
            return
        adapters.install(self.state_dir, update)
        self.adapter = adapters.load(self.state_dir, self.spec, self.backbone.fingerprint)
        log.info("installed adapter v%d (published while this agent was away)", update.version)

    # ------------------------------------------------------------ evaluation

    def holdout(self) -> Holdout | None:
        if self.s.holdout_file is None:
            return None
        if self._holdout is None:
            self._holdout = load_holdout(Path(self.s.holdout_file), self.fx, self.state_dir)
        return self._holdout
