"""A worker's training side: pick the next job fairly, lease it, train a slice, publish the adapter.

The worker (side_server/worker.py) runs :meth:`Training._train_loop` on a thread of its own. Jobs
are picked by least attained service per device (a short job waits about one slice behind a long
one); a slice trains for ``train_slice`` seconds (longer if nothing else waits) and checkpoints;
a job of a cohort member trains on its cohort's pool (side_server/pooling.py) and its adapter goes
to every member; federated cohorts are averaged when due (side_server/federated.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import redis

from schemas.adapter import AdapterUpdate
from schemas.base import Message
from schemas.jobs import CacheReport
from schemas.progress import Progress
from schemas.schedule import EpochReport
from schemas.transport import TransportError
from side_server.cache import ActivationCache
from side_server.config import ServerSettings
from side_server.federated import Federation
from side_server.fleet import FleetLog
from side_server.metrics import WorkerMetrics
from side_server.outage import Outage
from side_server.pooling import Pool, TrainingSet
from side_server.store import JobRecord, JobStore
from side_server.trainer import train

log = logging.getLogger("sidetune.server")

#: Jobs whose tapped states a worker keeps in memory between slices (so a job it trains slice
#: after slice is read from Redis once). Each is bounded by the training-memory quota.
LOADED_JOBS = 2


@dataclass
class Stats:
    received: int = 0
    rejected: int = 0
    samples_cached: int = 0
    jobs_trained: int = 0
    epochs_trained: int = 0
    slices: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


class Training:
    """The training half of :class:`side_server.worker.Worker` (whose ``__init__`` sets these)."""

    s: ServerSettings
    r: redis.Redis
    store: JobStore
    cache: ActivationCache
    pool: Pool
    federation: Federation
    fleet: FleetLog
    metrics: WorkerMetrics
    stats: Stats
    stopping: threading.Event
    _loaded: OrderedDict[tuple[str, str], TrainingSet]
    _unreleased: tuple[str, str] | None
    _next_reap: float

    def _send(self, msg: Message, retain: bool = False) -> None:
        raise NotImplementedError

    def _train_loop(self) -> None:
        outage = Outage("redis", "the training loop", log)  # one line when Redis goes, one when it is back
        while not self.stopping.is_set():
            try:
                if self._unreleased is not None:  # a slice ended while Redis was away
                    self.store.release(*self._unreleased, self.s.worker_id, clean=True)
                    self._unreleased = None
                if time.monotonic() >= self._next_reap:
                    self._next_reap = time.monotonic() + min(60.0, self.s.abandoned_after / 4)
                    self.reap()
                self.federation.due()
                picked = self._pick()
                outage.over()
                if picked is None:
                    time.sleep(0.2)
                    continue
                self._run_leased(*picked)
            except (redis.RedisError, TransportError) as e:
                self.stopping.wait(outage.failed(e))
            except Exception:
                log.exception("training loop error")
                time.sleep(1.0)

    def _pick(self) -> tuple[str, str, int] | None:
        """The next job to train a slice of: the device whose jobs got the least training time
        lately first (least attained service: a short job waits at most about one slice behind a
        long one, and a long one still gets every slice nobody else wants), then its oldest
        ready job. Takes its lease (counting an attempt)."""
        ready = self.store.ready()
        if not ready:
            return None
        held = self.store.leased([(d, j) for d, j, _ in ready])
        free = [x for x, h in zip(ready, held) if not h]
        service = self.store.service(sorted({d for d, _, _ in free}))
        for dev, jid, _ in sorted(free, key=lambda x: (service.get(x[0], 0.0), x[2])):
            attempts = self.store.lease(dev, jid, self.s.worker_id, self.s.lease_seconds)
            if attempts < 0:
                self.store.unready(dev, jid)  # closed meanwhile
            elif attempts > 0:
                return dev, jid, attempts
        return None

    def _run_leased(self, device: str, job_id: str, attempts: int) -> None:
        clean = False
        try:
            if attempts > self.s.max_attempts:
                self._give_up(device, job_id, f"training was cut short {attempts - 1} times (a worker was killed "
                                              "or ran out of memory while training it)")
                return
            self.stats.slices += 1
            t0 = time.monotonic()
            try:
                self.run_slice(device, job_id)
            finally:
                self.metrics.trained(device)
                self.metrics.train_seconds.inc(time.monotonic() - t0)
                self.store.charge_service(device, time.monotonic() - t0)
            clean = True
        except (redis.RedisError, TransportError):
            self._unreleased = (device, job_id)  # not the job's fault: given back (clean) once Redis answers
            raise
        except Exception as e:  # a job that cannot train must not spin forever
            log.exception("job %s/%s failed (attempt %d of %d)", device, job_id, attempts, self.s.max_attempts)
            if attempts >= self.s.max_attempts:
                self._give_up(device, job_id, f"training failed {attempts} times: {type(e).__name__}: {e}")
        finally:
            if self._unreleased != (device, job_id):
                self.store.release(device, job_id, self.s.worker_id, clean=clean)

    def _give_up(self, device: str, job_id: str, reason: str) -> None:
        log.warning("job %s/%s failed: %s", device, job_id, reason, extra={"device": device, "job": job_id})
        self._forget_loaded((device, job_id))
        self.store.fail(device, job_id, reason)
        self._closed(device, job_id, "failed", reason=reason)
        self._send(Progress(device_id=device, job_id=job_id, state="failed", detail=reason[:2000]))

    def reap(self) -> None:
        """Close the waiting jobs of devices silent for ``abandoned_after`` seconds."""
        active = self.store.active()
        if not active:
            return
        now = float(self.r.time()[0])
        seen = self.store.silent_since(sorted({d for d, _ in active}))
        for dev, jid in active:
            silent = now - seen.get(dev, 0.0)
            if silent < self.s.abandoned_after:
                continue
            reason = f"abandoned: nothing heard from the device for {silent:.0f} s while the job waited for its uploads"
            if self.store.abandon(dev, jid, reason):
                log.info("job %s/%s %s", dev, jid, reason, extra={"device": dev, "job": jid})
                self._closed(dev, jid, "failed", reason=reason)
                self._send(Progress(device_id=dev, job_id=jid, state="failed", detail=reason))

    def _closed(self, device: str, job_id: str, state: str, reason: str = "", version: int | None = None) -> None:
        """Count a job this worker ended, and record its end for the fleet's views."""
        self.metrics.jobs.labels(state).inc()
        created = self.fleet.created_at(device, job_id)
        if created is not None:
            self.metrics.job_seconds.observe(max(0.0, time.time() - created))
        self.fleet.job_state(device, job_id, state, reason=reason, adapter_version=version)

    def _others_waiting(self, device: str, job_id: str, running: float) -> bool:
        """Whether another ready job waits for a worker whose device is owed a turn: it got less
        training time lately than this device with this slice's ``running`` seconds."""
        others = [(d, j) for d, j, _ in self.store.ready() if (d, j) != (device, job_id)]
        free = [d for (d, _), held in zip(others, self.store.leased(others)) if not held]
        if not free:
            return False
        service = self.store.service(sorted({*free, device}))
        return min(service[d] for d in free) <= service[device] + running

    def _training_data(self, device: str, job_id: str, rec: JobRecord) -> tuple[TrainingSet | None, list[str]]:
        """What the run trains on (the job's samples, or its cohort's pool), or the job's keys that
        are gone from the cache; from this worker's memory if it trained the job last."""
        got = self._loaded.get((device, job_id))
        if got is not None:
            self._loaded.move_to_end((device, job_id))
            if got.co_leased:  # leases taken for the run's first slice, kept for the others
                self.pool.renew(got)
            return got, []
        keys = self.store.keys(device, job_id)
        states, gone = self.cache.get_many(device, keys, rec.spec.tap_rows)
        targets = self.store.targets(device, job_id, rec)
        if states is None or targets is None:
            return None, gone
        if self.pool.pooled(rec):
            tset = self.pool.gather(rec, keys, states, targets)
        else:
            tset = TrainingSet(states, targets, jobs=[(device, job_id)])
        self._loaded[(device, job_id)] = tset
        while len(self._loaded) > LOADED_JOBS:
            self._forget_loaded(next(iter(self._loaded)))
        return tset, []

    def _forget_loaded(self, job: tuple[str, str]) -> None:
        tset = self._loaded.pop(job, None)
        if tset is not None:
            self.pool.release(tset)

    def run_slice(self, device: str, job_id: str) -> None:
        """Train the job for one slice (``train_slice`` seconds, longer if nothing else waits);
        publish its adapter if that was its last."""
        rec = self.store.get(device, job_id)
        if rec is None or rec.closed:
            self.store.unready(device, job_id)
            return
        tset, gone = self._training_data(device, job_id, rec)
        if tset is None and gone:  # evicted or expired since: ask the board again
            log.info("job %s/%s: %d cached samples are gone; asking again", device, job_id, len(gone))
            self.store.need(device, job_id, gone)
            self.fleet.job_state(device, job_id, "waiting")
            self._send(CacheReport(device_id=device, job_id=job_id, total=rec.samples, missing=tuple(gone)))
            return
        if tset is None:
            self._give_up(device, job_id, "the job's records are damaged (targets missing); send it again")
            return
        self.store.set_state(device, job_id, "training")
        self.fleet.job_state(device, job_id, "training")
        pooled = bool(tset.members)
        if pooled:
            init = self.pool.init_weights(rec)
        else:
            init = self.store.adapter(device, rec.base_version) if rec.base_version else None
        ckpt = self.store.checkpoint(device, job_id)
        t0 = time.perf_counter()
        epochs = rec.hyper.epochs
        started = time.monotonic()
        slice_end = started + self.s.train_slice
        stopped = False

        def keep_going() -> bool:
            nonlocal slice_end
            if self.stopping.is_set():
                return False
            if time.monotonic() < slice_end:
                return True
            if self._others_waiting(device, job_id, time.monotonic() - started):
                return False  # fair share: another job's turn
            slice_end = time.monotonic() + self.s.train_slice
            self.pool.renew(tset)
            return self.store.renew(device, job_id, self.s.worker_id, self.s.lease_seconds)

        def should_pause() -> bool:
            return not keep_going()

        def on_pause(blob: bytes) -> None:
            nonlocal stopped
            stopped = True
            self.store.save_checkpoint(device, job_id, self.s.worker_id, blob)

        def on_epoch(rep: EpochReport, blob: bytes) -> bool:
            nonlocal stopped
            self.stats.epochs_trained += 1
            self.metrics.epochs.inc()
            self.metrics.training(device, rep.epoch, rep.train_loss)
            self.fleet.epoch(device, job_id, rep.epoch, rep.train_loss, rep.val_loss)
            if self.stopping.is_set() or not self.store.renew(device, job_id, self.s.worker_id, self.s.lease_seconds):
                stopped = True
                return False
            self.pool.renew(tset)
            self.store.save_checkpoint(device, job_id, self.s.worker_id, blob)
            self._send(Progress(device_id=device, job_id=job_id, state="training", epoch=rep.epoch, epochs=epochs,
                                train_loss=rep.train_loss, val_loss=rep.val_loss, samples_cached=rec.samples,
                                samples_total=rec.samples))
            if rep.epoch < epochs and not keep_going():
                stopped = True
                return False
            return True

        net, reports = train(rec.spec, rec.hyper, tset.states, tset.targets, init_weights=init, checkpoint=ckpt,
                             on_epoch=on_epoch, should_pause=should_pause, on_pause=on_pause,
                             sample_weight=tset.weights)
        if stopped:
            log.debug("job %s/%s paused (its slice ended, the lease was lost or the worker stops)", device, job_id)
            return
        weights = net.to_weights()
        metrics: dict[str, float] = {"train_seconds": time.perf_counter() - t0, "samples": float(len(tset.states))}
        if pooled:
            version = self.pool.version(rec, tset)
            metrics["cohort_members"] = float(len(tset.members))
        else:
            version = self.store.assign_version(device, job_id)
            self.store.save_adapter(device, version, weights)
        if reports:
            metrics["train_loss"] = reports[-1].train_loss
            if reports[-1].val_loss is not None:
                metrics["val_loss"] = reports[-1].val_loss
        gates = net.gates()
        if gates:
            metrics["mean_gate"] = float(np.mean(gates))
        if pooled:
            self.pool.cohorts.save_adapter(rec.cohort, version, weights, {"job_id": job_id, "metrics": metrics})
            targets = self.pool.publish_targets(rec, tset)
        else:
            targets = {device: job_id}
        for member, jid in targets.items():  # the job's device, or every member of its cohort
            self._send(AdapterUpdate(device_id=member, job_id=jid, version=version, base_version=rec.base_version,
                                     backbone_fingerprint=rec.fingerprint, spec=rec.spec, weights=weights,
                                     metrics=metrics), retain=True)
        for dev, jid in tset.jobs:  # the job, and the cohort's waiting jobs this run included
            self.store.finish(dev, jid)
            self._closed(dev, jid, "done", version=version)
            self.stats.jobs_trained += 1
            n = rec.samples if (dev, jid) == (device, job_id) else tset.members.get(dev, 0)
            self._send(Progress(device_id=dev, job_id=jid, state="done", epoch=epochs, epochs=epochs,
                                train_loss=metrics.get("train_loss"), val_loss=metrics.get("val_loss"),
                                samples_cached=n, samples_total=n, detail=f"adapter version {version} published"))
        self._forget_loaded((device, job_id))
        log.info("job %s/%s done: adapter v%d%s", device, job_id, version,
                 f" for the {len(targets)} members of cohort {rec.cohort}" if pooled else "",
                 extra={"device": device, "job": job_id})
