"""What one training run of a job is made of: the job's own samples, or its cohort's pool.

A job of a cohort member trains the cohort's side network on the union of the members'
samples (each member's latest job whose samples are all cached), warm from the cohort's
current adapter, with each member's share of the loss capped (``cohort_max_share``). Other
members' jobs that are ready and not being trained elsewhere are leased by the same worker
and finished by the same run: one training serves every member that waits. The run's adapter
goes to every member (``publish_targets``), so a member whose round is not open installs it
as a newer version, and one that joins later gets the current one when it next comes online.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from side_server.cache import ActivationCache
from side_server.cohorts import CohortRegistry, CohortStore, PoolEntry, member_weights
from side_server.store import JobRecord, JobStore

log = logging.getLogger("sidetune.server")

#: A member's target is ``M·(onehot(y) − p) + noise``: its norm is at most √2, plus the noise in the
#: K − C extra dimensions (noise_std 0.1: about 0.25 for K = 8). Pooled targets are clipped to this
#: norm, so a member that sends huge targets moves the cohort by its capped share of the loss,
#: not by the size of its numbers.
TARGET_NORM_MAX = 1.5


def clip_targets(t: np.ndarray, bound: float = TARGET_NORM_MAX) -> np.ndarray:
    """(N, K) targets with every row's L2 norm at most ``bound``."""
    norm = np.linalg.norm(t, axis=1, keepdims=True)
    return (t * np.minimum(1.0, bound / np.maximum(norm, 1e-12))).astype(np.float32)


@dataclass
class TrainingSet:
    states: np.ndarray  # (N, T, d) float32: tapped states
    targets: np.ndarray  # (N, K)
    weights: np.ndarray | None = None  # (N,), mean 1; None: every sample alike
    #: (device, job) whose samples are in it; the first is the job the worker picked, the
    #: others are jobs it leased for this run (finished with it).
    jobs: list[tuple[str, str]] = field(default_factory=list)
    #: cohort members -> samples of theirs in it (empty for a lone job)
    members: dict[str, int] = field(default_factory=dict)

    @property
    def co_leased(self) -> list[tuple[str, str]]:
        return self.jobs[1:]


class Pool:
    def __init__(self, store: JobStore, cache: ActivationCache, cohorts: CohortStore, registry: CohortRegistry,
                 *, worker_id: str, lease_seconds: float, max_share: float, max_samples: int) -> None:
        self.store, self.cache, self.cohorts, self.registry = store, cache, cohorts, registry
        self.worker_id, self.lease_seconds = worker_id, lease_seconds
        self.max_share, self.max_samples = max_share, max_samples

    def pooled(self, rec: JobRecord) -> bool:
        """Whether this job trains on its cohort's pool: the job names the cohort and the
        registry still says the device is a member (one removed since trains alone)."""
        return bool(rec.cohort) and self.registry.cohort_of(rec.device) == rec.cohort

    def gather(self, rec: JobRecord, own_keys: list[str], own_states: np.ndarray,
               own_targets: np.ndarray) -> TrainingSet:
        """The cohort's pool for a run of ``rec`` (the caller holds its lease)."""
        cohort = rec.cohort
        members = self.registry.members(cohort)
        self.cohorts.put(cohort, rec.device, rec.job_id, own_keys, own_targets)
        jobs = [(rec.device, rec.job_id)] + self._lease_waiting_members(rec, members)
        entries = self.cohorts.entries(cohort, members, rec.spec.out_dim)
        per = max(1, self.max_samples // max(1, len(entries)))
        states: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        counts: dict[str, int] = {}
        for e in entries:
            if e.device == rec.device:
                x, y = own_states, own_targets
            else:
                got = self._member_states(rec, e)
                if got is None:
                    continue
                x, y = got, e.targets
            if len(x) > per:  # the pool is bounded: each member keeps its newest samples
                x, y = x[-per:], y[-per:]
            states.append(x)
            targets.append(y)
            counts[e.device] = len(x)
        weights = member_weights(list(counts.values()), self.max_share) if len(counts) > 1 else None
        log.info("job %s/%s trains cohort %s: %d members, %d samples (%s)", rec.device, rec.job_id, cohort,
                 len(counts), sum(counts.values()), ", ".join(f"{d} {n}" for d, n in counts.items()),
                 extra={"device": rec.device, "job": rec.job_id})
        return TrainingSet(np.concatenate(states), clip_targets(np.concatenate(targets)), weights, jobs, counts)

    def _member_states(self, rec: JobRecord, e: PoolEntry) -> np.ndarray | None:
        x, gone = self.cache.get_many(e.device, e.keys, rec.spec.tap_rows)
        if x is None:
            # expired or evicted: the member's next job uploads them again; until then it is left out
            log.info("cohort %s: %d of %s's pooled samples are gone from the cache; left out of this run",
                     rec.cohort, len(gone), e.device)
        return x

    def _lease_waiting_members(self, rec: JobRecord, members: list[str]) -> list[tuple[str, str]]:
        """Other members' jobs of this cohort that wait, ready, with no worker: lease them, put
        them in the pool, and let this run finish them."""
        out = []
        for dev, jid, _ in self.store.ready():
            if dev == rec.device or dev not in members:
                continue
            other = self.store.get(dev, jid)
            if other is None or other.closed or other.cohort != rec.cohort:
                continue
            if other.fingerprint != rec.fingerprint or other.spec != rec.spec:
                continue
            if self.store.lease(dev, jid, self.worker_id, self.lease_seconds) <= 0:
                continue
            keys = self.store.keys(dev, jid)
            targets = self.store.targets(dev, jid, other)
            if targets is None or self.cache.missing(dev, keys):
                self.store.release(dev, jid, self.worker_id, clean=True)
                continue
            self.cohorts.put(rec.cohort, dev, jid, keys, targets)
            out.append((dev, jid))
        return out

    def release(self, tset: TrainingSet) -> None:
        for dev, jid in tset.co_leased:
            self.store.release(dev, jid, self.worker_id, clean=True)

    def renew(self, tset: TrainingSet) -> None:
        for dev, jid in tset.co_leased:
            self.store.renew(dev, jid, self.worker_id, self.lease_seconds)

    def init_weights(self, rec: JobRecord) -> bytes | None:
        """Warm start: the cohort's current adapter."""
        v = self.cohorts.version(rec.cohort)
        got = self.cohorts.adapter(rec.cohort, v) if v else None
        return got[0] if got is not None else None

    def version(self, rec: JobRecord, tset: TrainingSet) -> int:
        """The run's cohort adapter version, assigned once (the same after a crash and retry), above
        every included member's own version so that each of them installs it."""
        if rec.version:
            return rec.version
        floor = max([rec.base_version] + [r.base_version for d, j in tset.co_leased
                                          if (r := self.store.get(d, j)) is not None])
        v = self.cohorts.next_version(rec.cohort, floor)
        return self.store.set_version(rec.device, rec.job_id, v)

    def publish_targets(self, rec: JobRecord, tset: TrainingSet) -> dict[str, str]:
        """member -> the job id its copy of the run's adapter carries (its own job if the run
        included it, so that its round finishes; else the trained job's). A member whose own job
        waits is skipped: the run of that job includes this one's samples and reaches it anyway."""
        own = dict(tset.jobs)
        waiting = {d for d, _ in self.store.active()} - set(own)
        return {m: own.get(m, rec.job_id) for m in self.registry.members(rec.cohort) if m not in waiting}
