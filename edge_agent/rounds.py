"""A round: forward passes (once per new sample) → job → uploads of what the server lacks → adapter.

(Over 400 lines because the three kinds of round — server-trained, board-trained and a federated
member's — still share this one class; each is to move into a module of its own.)

Everything a round decides is written to the ledger before it is sent, so an
agent restarted mid-round resumes it: it sends the same job again and the
server answers with what it still lacks (or that it is done).

With ``train_on = "board"`` a round sends nothing: after the forward passes the
board trains the side network itself (schemas/sidenet.py) on its own
cached states and the mixed targets of the TRUE labels (nothing leaves the
board, so no randomised response and no noise in the extra target dimensions),
and installs the result as the next adapter version; only the board's status
(its adapter version) is published. Its samples keep their pivot states in the
ledger, since every later round trains on them again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.config import EdgeSettings
from edge_agent.evaluate import Holdout, load_holdout
from edge_agent.ledger import Ledger, Sample
from edge_agent.model import LocalModel
from edge_agent.upload import activation_messages
from schemas import sidenet
from schemas.adapter import AdapterUpdate
from schemas.base import Message
from schemas.errors import SpecMismatch
from schemas.jobs import CacheReport, Job
from schemas.progress import Progress
from schemas.schedule import EpochReport
from schemas.status import Rejection
from schemas.tensors import WireTensor
from schemas.topics import topic
from schemas.updates import WeightUpdate
from schemas.weights import decode_weights, encode_weights
from schemas.wire import decode, encode

log = logging.getLogger("sidetune.edge")

#: Forward passes between two ledger commits (and log lines).
CHUNK = 64
#: Rejections of a job that say "not now" rather than "never": the round waits and sends it again.
RETRY_LATER = frozenset({"quota_rate", "quota_jobs", "server_full"})
#: A key the server asks for again within this many seconds was just queued: not sent twice.
RESEND_AFTER = 30.0

Send = Callable[[list[tuple[str, bytes, bool]], "int | None"], None]


@dataclass
class Round:
    number: int
    job: Job | WeightUpdate  # what the round sent: a job, or a federated member's update
    started: float
    last_heard: float
    uploaded: dict[str, float] = field(default_factory=dict)  # key -> when queued
    training: bool = False
    iteration: int = 1  # a federated round's FedAvg round (its update's job id says it too)

    @property
    def keys(self) -> list[str]:
        return list(self.job.keys) if isinstance(self.job, Job) else []


class Rounds:
    def __init__(self, settings: EdgeSettings, model: LocalModel, ledger: Ledger, send: Send, *,
                 pet: Callable[[], None], stopping: threading.Event,
                 on_installed: Callable[[], None] = lambda: None) -> None:
        self.s = settings
        self.model = model
        self.ledger = ledger
        self.send = send  # into the outbox (ledger), then to the broker
        self.pet = pet
        self.stopping = stopping
        self.on_installed = on_installed
        self.current: Round | None = None
        self._holdout: Holdout | None = None
        self.forward_rate: float | None = None  # forward passes per second in the last round (edge_agent/metrics.py)

    # ------------------------------------------------------------ start, resume, resend

    def start(self) -> int | None:
        """Run the forward passes of every new sample, then queue the job of all samples."""
        t0 = time.time()
        cpu0 = time.process_time()
        # Shortest first: each chunk's batches then hold sequences of about one length, so almost no
        # forward-pass work goes into padding (the backbone sorts only within what it is given).
        fresh = sorted(self.ledger.samples("round IS NULL AND prior IS NULL"), key=lambda s: len(s.token_ids))
        log.info("round starting: %d new samples need a forward pass, %d new in all", len(fresh),
                 self.ledger.count_new())
        passes = 0
        for i in range(0, len(fresh), CHUNK):
            if self.stopping.is_set():  # SIGTERM: what was computed is kept, the round starts next time
                log.info("stopping during forward passes (%d/%d kept)", passes, len(fresh))
                return None
            part = fresh[i : i + CHUNK]
            f = self.model.fx.from_token_ids([s.token_ids for s in part])
            self.ledger.set_features([(s.key, f.prior[j], f.states[j]) for j, s in enumerate(part)])
            passes += len(part)
            self.ledger.set_meta("activity", f"forward passes {passes}/{len(fresh)}")
            log.info("forward passes: %d/%d", passes, len(fresh))
        if passes:
            self.forward_rate = passes / max(time.time() - t0, 1e-6)
        if self.s.cohort is not None and self.s.pool == "weights":
            return self._federated(t0, passes, time.process_time() - cpu0)
        if self.s.cohort is None and self.s.train_on == "board":
            return self._train_on_board(t0, passes, time.process_time() - cpu0)
        rng = np.random.default_rng(int.from_bytes(uuid.uuid4().bytes[:8], "little"))
        # Label-DP: each sample's reported label is drawn once (ledger) and the same one is sent in every round.
        drawn = self.ledger.draw_sent_labels(self.model.task.num_classes, self.s.label_epsilon, rng)
        everything = self.ledger.samples("prior IS NOT NULL AND sent_label IS NOT NULL")
        n_new = self.ledger.count_new()  # every new sample has its prior by now
        labels = np.array([s.sent_label for s in everything])
        prior = np.stack([s.prior for s in everything if s.prior is not None])
        self.model.fit_calibration(prior)  # once, on the first round's samples; no label used
        targets = self.model.secret.targets(labels, self.model.calibrated(prior), self.s.noise_std, rng)
        rnd = self.ledger.new_round("pending", len(everything), n_new)
        job = Job(device_id=self.s.device_id, job_id=f"r{rnd}-{uuid.uuid4().hex[:8]}",
                  backbone_fingerprint=self.model.backbone.fingerprint, spec=self.model.spec, hyper=self.s.hyper,
                  base_adapter_version=self.model.adapter_version,
                  keys=tuple(s.key for s in everything), targets=WireTensor.from_array(targets, "float32"),
                  cohort=self.s.cohort)
        t, payload = encode(job)
        self.ledger.update_round(rnd, job_id=job.job_id, state="sent", forward_passes=passes, job_payload=payload,
                                 started=t0)
        self.send([(t, payload, False)], rnd)
        self.current = Round(rnd, job, t0, time.time())
        self.ledger.set_meta("activity", f"round {rnd}: waiting for the server")
        eps = self.s.label_epsilon
        dp = ("labels sent as they are: label_epsilon = inf" if eps == float("inf")
              else f"{drawn} new labels through randomised response at ε={eps:g}")
        log.info("round %d: job %s with %d samples (%d new, %d forward passes, %s)",
                 rnd, job.job_id, len(everything), n_new, passes, dp)
        return rnd

    def _train_on_board(self, t0: float, passes: int, forward_cpu: float) -> int | None:
        """Train on the board's own cached states (nothing is sent) and install the result."""
        everything = self.ledger.samples("prior IS NOT NULL")
        rnd = self.ledger.new_round("board", len(everything), self.ledger.count_new())
        self.ledger.update_round(rnd, job_id=f"board-r{rnd}", state="training", forward_passes=passes, started=t0)
        got = self._local_training(rnd, everything, forward_cpu)
        if got is None:
            return None
        weights, metrics, _ = got
        update = AdapterUpdate(device_id=self.s.device_id, job_id=f"board-r{rnd}", version=self.model.adapter_version + 1,
                               base_version=self.model.adapter_version, backbone_fingerprint=self.model.backbone.fingerprint,
                               spec=self.model.spec, weights=weights, metrics=metrics)
        self._install(rnd, [s.key for s in everything], update, t0, keep_states=True)
        return rnd

    def _federated(self, t0: float, passes: int, forward_cpu: float, rnd: int | None = None,
                   iteration: int = 1) -> int | None:
        """A federated cohort member: train the cohort's network on the board (clean labels, nothing
        per sample leaves it) and send only the change of its weights; the cohort's average comes
        back as the next adapter, and the board trains from it again (``federated_rounds``)."""
        everything = self.ledger.samples("prior IS NOT NULL")
        if rnd is None:
            rnd = self.ledger.new_round("federated", len(everything), self.ledger.count_new())
            self.ledger.update_round(rnd, forward_passes=passes, started=t0)
        job_id = f"fed-r{rnd}-i{iteration}-{uuid.uuid4().hex[:8]}"
        self.ledger.update_round(rnd, job_id=job_id, state="training")
        got = self._local_training(rnd, everything, forward_cpu)
        if got is None:
            return None
        weights, metrics, base = got
        trained = decode_weights(weights, self.model.spec)
        delta = encode_weights({k: trained[k] - base[k] for k in trained}, self.model.spec)
        assert self.s.cohort is not None
        update = WeightUpdate(device_id=self.s.device_id, job_id=job_id, cohort=self.s.cohort,
                              backbone_fingerprint=self.model.backbone.fingerprint, spec=self.model.spec,
                              base_version=self.model.adapter_version, init_seed=self.s.hyper.seed,
                              samples=len(everything), delta=delta)
        t, payload = encode(update)
        self.ledger.update_round(rnd, state="sent", job_payload=payload)
        self.send([(t, payload, False)], rnd)
        self.current = Round(rnd, update, t0, time.time(), iteration=iteration)
        self.ledger.set_meta("activity", f"round {rnd}: update {iteration}/{self.s.federated_rounds} sent, "
                                         "waiting for the cohort's average")
        log.info("round %d: update %d/%d (%s) sent to cohort %s (%d samples, %.1f KB, from v%d; board training "
                 "%.2f CPU-s)", rnd, iteration, self.s.federated_rounds, job_id, self.s.cohort, len(everything),
                 len(payload) / 1024, self.model.adapter_version, metrics["board_train_cpu_s"])
        return rnd

    def _local_training(self, rnd: int, everything: list[Sample],
                        forward_cpu: float) -> tuple[bytes, dict[str, float], dict[str, np.ndarray]] | None:
        """Train the side network on the board's own cached states from the true labels, starting
        from the installed adapter: (weights, metrics, the weights it started from), None if stopped."""
        self.ledger.set_meta("activity", f"round {rnd}: training on the board")
        spec, taps = self.model.spec, list(self.model.spec.taps)
        cpu0 = time.process_time()
        # dropped after a server-trained round; shortest first, as in start()
        missing = sorted((s for s in everything if s.states is None), key=lambda s: len(s.token_ids))
        if missing:
            for i in range(0, len(missing), CHUNK):
                part = missing[i : i + CHUNK]
                f = self.model.fx.from_token_ids([s.token_ids for s in part])
                for j, s in enumerate(part):
                    s.states = f.states[j].astype("<f2").tobytes()
                self.ledger.set_features([(s.key, f.prior[j], f.states[j]) for j, s in enumerate(part)])
                self.pet()
            self.ledger.add_round_counts(rnd, forward_passes=len(missing))
            forward_cpu += time.process_time() - cpu0
            cpu0 = time.process_time()
        shape = (spec.num_states, spec.width)
        tapped = np.stack([np.frombuffer(s.states or b"", "<f2").reshape(shape)[taps] for s in everything])
        labels = np.array([s.label for s in everything])
        prior = np.stack([s.prior for s in everything if s.prior is not None])
        self.model.fit_calibration(prior)
        targets = self.model.secret.targets(labels, self.model.calibrated(prior), 0.0, np.random.default_rng(0))
        base = self.model.adapter.forward.w if self.model.adapter is not None else sidenet.init_weights(
            spec, self.s.hyper.seed)
        init = encode_weights(base, spec)

        def on_epoch(rep: EpochReport) -> bool:
            self.pet()
            self.ledger.set_meta("activity", f"round {rnd}: training on the board, epoch {rep.epoch}/{self.s.hyper.epochs}")
            log.info("round %d: epoch %d/%d train loss %.4f val loss %s (board)", rnd, rep.epoch, self.s.hyper.epochs,
                     rep.train_loss, f"{rep.val_loss:.4f}" if rep.val_loss is not None else "-")
            return not self.stopping.is_set()

        weights, reports = sidenet.train(spec, self.s.hyper, tapped, targets, init=init, on_epoch=on_epoch)
        train_cpu = time.process_time() - cpu0
        if self.stopping.is_set():
            self._fail_number(rnd, "the agent stopped during board training")
            return None
        metrics = {"train_loss": reports[-1].train_loss, "board_train_cpu_s": train_cpu, "forward_cpu_s": forward_cpu}
        vals = [r.val_loss for r in reports if r.val_loss is not None]
        if vals:
            metrics["val_loss"] = min(vals)
        log.info("round %d: trained on the board in %.2f CPU-s (forward passes %.2f CPU-s), %d samples", rnd, train_cpu,
                 forward_cpu, len(everything))
        return weights, metrics, base

    def resume(self) -> None:
        row = self.ledger.open_round()
        if row is None:
            return
        if row["state"] == "preparing" or not row.get("job_payload"):
            self.ledger.update_round(int(row["round"]), state="failed", detail="agent stopped before the job was sent")
            return
        kind = "updates" if str(row["job_id"]).startswith("fed-") else "jobs"
        job = decode(topic(self.s.device_id, kind), row["job_payload"])
        assert isinstance(job, (Job, WeightUpdate))
        iteration = int(str(row["job_id"]).split("-")[2][1:]) if kind == "updates" else 1  # fed-rN-iK-hex
        self.current = Round(int(row["round"]), job, float(row["started"] or time.time()), time.time(),
                             iteration=iteration)
        log.info("resuming round %d (job %s); asking the server where it stands", self.current.number, job.job_id)
        self.resend_job()

    def resend_job(self) -> None:
        """Same job, same content: the server answers again what it lacks (or that it is done)."""
        r = self.current
        assert r is not None
        t, payload = encode(r.job)
        r.last_heard = time.time()
        r.uploaded.clear()  # whatever the server still lacks is sent again
        self.send([(t, payload, False)], r.number)

    def check_timeout(self) -> None:
        r = self.current
        if r is not None and time.time() - r.last_heard > self.s.round_timeout:
            log.warning("round %d: nothing heard for %.0f s; sending the job again", r.number, self.s.round_timeout)
            self.resend_job()

    # ------------------------------------------------------------ server messages

    def handle(self, msg: Message, nbytes: int) -> None:
        if isinstance(msg, AdapterUpdate) and (self.current is None or msg.job_id != self.current.job.job_id):
            self._maybe_install_retained(msg, nbytes)
            return
        r = self.current
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
                self.ledger.set_meta("activity", f"round {r.number}: server training, epoch {msg.epoch}/{msg.epochs}")
                log.info("round %d: epoch %d/%d train loss %.4f val loss %s", r.number, msg.epoch, msg.epochs,
                         msg.train_loss or 0.0, f"{msg.val_loss:.4f}" if msg.val_loss is not None else "-")
            elif msg.state == "failed":
                self._fail(r, f"server: {msg.detail}")
        elif isinstance(msg, Rejection):
            log.warning("round %d: server rejected %s: %s (%s)", r.number, msg.ref_topic, msg.reason, msg.code)
            if msg.ref_msg_id != r.job.msg_id or msg.code == "replayed":
                return
            if msg.code in RETRY_LATER:  # the job is sent again after round_timeout of silence
                log.info("round %d: the server is busy (%s); the job goes again in %.0f s", r.number, msg.code,
                         self.s.round_timeout)
            else:
                self._fail(r, f"job rejected: {msg.reason}")
        elif isinstance(msg, AdapterUpdate):
            self._finish(r, msg)

    def _upload(self, r: Round, missing: list[str]) -> None:
        now = time.time()
        todo = [k for k in missing if now - r.uploaded.get(k, 0.0) > RESEND_AFTER]
        if not todo:
            return
        self.ledger.update_round(r.number, state="uploading")
        up = activation_messages(self.s, self.model, self.ledger, r.job.job_id, todo, self.pet)
        if up.unknown:
            log.warning("round %d: server asks for %d keys this board does not know", r.number, len(up.unknown))
        if up.recomputed:
            self.ledger.add_round_counts(r.number, forward_passes=up.recomputed)
        for k in up.keys:
            r.uploaded[k] = now
        self.send(up.messages, r.number)
        self.ledger.set_meta("activity", f"round {r.number}: uploading {len(up.keys)} activations")
        log.info("round %d: uploading %d activations in %d messages", r.number, len(up.keys), len(up.messages))

    def _finish(self, r: Round, update: AdapterUpdate) -> None:
        if isinstance(r.job, WeightUpdate):  # the cohort's average: the board trains on these states again
            if r.iteration < self.s.federated_rounds:
                try:
                    self.model.install(update)
                except SpecMismatch as e:
                    self._fail_number(r.number, str(e))
                    return
                log.info("round %d: the cohort's v%d (average %d/%d) installed; training from it again", r.number,
                         update.version, r.iteration, self.s.federated_rounds)
                self.current = None
                self._federated(r.started, 0, 0.0, rnd=r.number, iteration=r.iteration + 1)
                return
            keys = [s.key for s in self.ledger.samples("prior IS NOT NULL AND round IS NULL")]
            self._install(r.number, keys, update, r.started, keep_states=True)
        else:
            self._install(r.number, r.keys, update, r.started)

    def _install(self, rnd: int, keys: list[str], update: AdapterUpdate, started: float, *,
                 keep_states: bool = False) -> None:
        try:
            self.model.install(update)
        except SpecMismatch as e:
            self._fail_number(rnd, str(e))
            return
        if keep_states:  # board training: the next round trains on these states again
            with self.ledger.tx() as db:
                db.executemany("UPDATE samples SET round=? WHERE key=? AND round IS NULL", [(rnd, k) for k in keys])
        else:
            self.ledger.assign_round(keys, rnd)
        fields: dict[str, object] = {"state": "done", "adapter_version": update.version, "finished": time.time(),
                                     "seconds": time.time() - started}
        holdout = self.holdout()
        if holdout is not None:
            fields["zero_shot_accuracy"] = holdout.accuracy(None, self.model.secret)
            fields["tuned_accuracy"] = holdout.accuracy(self.model.adapter, self.model.secret,
                                                       self.model.prior_bias)
        self.ledger.update_round(rnd, **fields)
        log.info("round %d done: adapter v%d installed (%s)", rnd, update.version,
                 ", ".join(f"{k} {v:.3f}" for k, v in fields.items() if k.endswith("accuracy")))  # type: ignore[str-format]
        self.ledger.set_meta("activity", "idle")
        self.current = None
        self.on_installed()

    def _fail(self, r: Round, why: str) -> None:
        self._fail_number(r.number, why)

    def _fail_number(self, rnd: int, why: str) -> None:
        log.error("round %d failed: %s", rnd, why)
        self.ledger.update_round(rnd, state="failed", detail=why[:500], finished=time.time())
        self.ledger.set_meta("activity", "idle")
        self.current = None

    def _maybe_install_retained(self, update: AdapterUpdate, nbytes: int = 0) -> None:
        """An adapter outside this board's round: published while it was away, or a newer version
        its cohort trained (its bytes count in the ledger's ``bytes_between_rounds``)."""
        if nbytes:
            self.ledger.set_meta("bytes_between_rounds", str(int(self.ledger.get_meta("bytes_between_rounds") or 0)
                                                             + nbytes))
        if update.version <= self.model.adapter_version:
            return
        if self.s.cohort is None and self.s.train_on == "board":  # it runs only what it trained itself
            log.warning("ignoring adapter v%d from the server: train_on = \"board\"", update.version)
            return
        try:
            self.model.install(update)
        except SpecMismatch as e:
            log.warning("ignoring adapter v%d: %s", update.version, e)
            return
        log.info("installed adapter v%d (published while this agent was away)", update.version)
        self.on_installed()

    # ------------------------------------------------------------ evaluation

    def holdout(self) -> Holdout | None:
        if self.s.holdout_file is None:
            return None
        if self._holdout is None:
            self._holdout = load_holdout(Path(self.s.holdout_file), self.model.fx, self.model.state_dir)
        return self._holdout
