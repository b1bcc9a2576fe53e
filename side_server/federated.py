"""Federated cohorts (``pool = "weights"``): the members' updates, averaged into the cohort's adapter.

Each member trains the cohort's side network on the board from its own clean labels and sends
only ``Δ = w_trained − w_base`` (:class:`schemas.updates.WeightUpdate`): no pivot state, no
target, nothing derived from a single sample. The server keeps each member's latest update
until the next average and forms

    w_next = w_current + Σ_m s_m · clip(Δ_m) + N(0, (σ·C·max_m s_m)²)

with ``s_m`` the members' capped sample shares (:func:`side_server.cohorts.capped_shares`), ``C``
the clipping norm and ``σ`` the noise multiplier (both off by default; with them on, each round
is a Gaussian mechanism on one member's whole update: user-level DP, :func:`epsilon`). An
average is formed once every registered member has an update waiting, or ``federated_wait``
seconds after the first one arrived, whichever comes first.

Key space (the cohort's hash tag, as in side_server/cohorts.py):

* ``st:fedup:{cohort/NAME}:<device>``  hash: job, base, n, seed, delta (safetensors), at
* ``st:fedpend:{cohort/NAME}``         hash: device -> its waiting update's job id
* ``st:fedseen:{cohort/NAME}``         hash: device -> the job id of its last update averaged in
* ``st:fedlock:{cohort/NAME}``         the worker forming an average (with a TTL)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import redis

from schemas.adapter import AdapterUpdate
from schemas.base import Message
from schemas.progress import Progress
from schemas.sidenet import Weights, init_weights
from schemas.spec import SideNetSpec
from schemas.updates import WeightUpdate
from schemas.weights import decode_weights, encode_weights
from side_server.cohorts import CohortRegistry, CohortStore, capped_shares, ckey
from side_server.quotas import Rejected

log = logging.getLogger("sidetune.server")

#: How long a worker may take to form and publish one average before another may.
LOCK_MS = 30_000


@dataclass(frozen=True)
class Pending:
    device: str
    job_id: str
    base: int
    samples: int
    seed: int
    delta: bytes
    at: float


class FederatedStore:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def put(self, u: WeightUpdate) -> bool:
        """Keep the member's update for the next average (replacing an older one of it); False
        if this update was averaged in already (a resend)."""
        c, dev = u.cohort, u.device_id
        if cast(bytes | None, self.r.hget(ckey("fedseen", c), dev)) == u.job_id.encode():
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(ckey("fedup", c, dev), mapping={"job": u.job_id, "base": u.base_version, "n": u.samples,
                                                  "seed": u.init_seed, "delta": u.delta, "at": time.time()})
        pipe.hset(ckey("fedpend", c), dev, u.job_id)
        pipe.execute()
        return True

    def pending(self, cohort: str) -> dict[str, str]:
        h = cast(dict[bytes, bytes], self.r.hgetall(ckey("fedpend", cohort)))
        return {k.decode(): v.decode() for k, v in h.items()}

    def take(self, cohort: str, members: list[str]) -> list[Pending]:
        out = []
        for dev, job in self.pending(cohort).items():
            if dev not in members:
                continue
            h = cast(dict[bytes, bytes], self.r.hgetall(ckey("fedup", cohort, dev)))
            if not h or h.get(b"job", b"").decode() != job:
                continue
            out.append(Pending(dev, job, int(h[b"base"]), int(h[b"n"]), int(h[b"seed"]), bytes(h[b"delta"]),
                               float(h[b"at"])))
        return out

    def oldest(self, cohort: str, members: list[str]) -> float | None:
        """When the oldest waiting update of these members arrived (None: none waits); reads only
        the updates' arrival times, not their changes."""
        devs = [d for d in self.pending(cohort) if d in members]
        if not devs:
            return None
        pipe = self.r.pipeline(transaction=False)
        for d in devs:
            pipe.hget(ckey("fedup", cohort, d), "at")
        at = [float(v) for v in pipe.execute() if v is not None]
        return min(at) if at else None

    def applied(self, cohort: str, taken: list[Pending]) -> None:
        """These updates are in the cohort's adapter now: a resend of one is not averaged again."""
        pipe = self.r.pipeline(transaction=True)
        for p in taken:
            pipe.hset(ckey("fedseen", cohort), p.device, p.job_id)
            pipe.hdel(ckey("fedpend", cohort), p.device)
            pipe.delete(ckey("fedup", cohort, p.device))
        pipe.execute()

    def lock(self, cohort: str, worker: str) -> bool:
        return bool(self.r.set(ckey("fedlock", cohort), worker, nx=True, px=LOCK_MS))

    def unlock(self, cohort: str, worker: str) -> None:
        if cast(bytes | None, self.r.get(ckey("fedlock", cohort))) == worker.encode():
            self.r.delete(ckey("fedlock", cohort))


def average(current: Weights, deltas: list[Weights], samples: list[int], *, max_share: float,
            clip: float = 0.0, noise_multiplier: float = 0.0, rng: np.random.Generator | None = None) -> Weights:
    """``w_current + Σ s_m·clip(Δ_m)`` (+ Gaussian noise): FedAvg with capped shares."""
    shares = capped_shares(samples, max_share)
    out = {k: v.astype(np.float64).copy() for k, v in current.items()}
    for s, d in zip(shares, deltas):
        scale = 1.0
        if clip > 0:
            norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in d.values()))
            scale = min(1.0, clip / max(norm, 1e-12))
        for k, v in d.items():
            out[k] += s * scale * v
    if clip > 0 and noise_multiplier > 0:
        rng = rng or np.random.default_rng()
        std = noise_multiplier * clip * float(shares.max())
        for k in out:
            out[k] += rng.normal(0.0, std, size=out[k].shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


def current_weights(spec_weights: bytes | None, pending: list[Pending], spec: SideNetSpec) -> Weights:
    """The weights the members' changes apply to: the cohort's adapter, or (before its first) the
    fresh network the members started from (every member seeds it alike: ``init_seed``)."""
    if spec_weights is not None:
        return decode_weights(spec_weights, spec)
    return init_weights(spec, pending[0].seed if pending else 0)


def epsilon(noise_multiplier: float, rounds: int, delta: float = 1e-5) -> float:
    """User-level (ε, δ) of ``rounds`` Gaussian averages with this noise multiplier (Rényi DP of
    the Gaussian mechanism, α·R/(2σ²), converted at the best order α); inf without noise."""
    if noise_multiplier <= 0 or rounds <= 0:
        return math.inf
    best = math.inf
    for a in [1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256]:
        best = min(best, rounds * a / (2 * noise_multiplier**2) + math.log(1 / delta) / (a - 1))
    return best


class Federation:
    """The server's part of federated cohorts: take the members' updates, form each average,
    publish it to every member."""

    def __init__(self, r: redis.Redis, registry: CohortRegistry, cohorts: CohortStore,
                 send: Callable[[Message, bool], None], *, worker_id: str, max_share: float, wait: float,
                 clip: float, noise_multiplier: float) -> None:
        self.fed = FederatedStore(r)
        self.registry, self.cohorts, self.send = registry, cohorts, send
        self.worker_id, self.max_share, self.wait = worker_id, max_share, wait
        self.clip, self.noise_multiplier = clip, noise_multiplier
        self._next_due = 0.0

    def on_update(self, u: WeightUpdate) -> None:
        if self.registry.cohort_of(u.device_id) != u.cohort:
            raise Rejected("not_member", f"device {u.device_id} is not a member of cohort {u.cohort} (the operator "
                                         "adds it: sidetune broker set-cohort); the update was not averaged")
        why = self.cohorts.bind(u.cohort, u.backbone_fingerprint, u.spec)
        if why is not None:
            raise Rejected("cohort_mismatch", f"{why}: a member's updates must be of the cohort's task")
        if not self.fed.put(u):
            self._resend_current(u)  # averaged in already: its round waits for that adapter
            return
        log.info("cohort %s: update %s from %s (%d samples, from v%d)", u.cohort, u.job_id, u.device_id, u.samples,
                 u.base_version, extra={"device": u.device_id, "job": u.job_id})
        members = self.registry.members(u.cohort)
        waiting = set(self.fed.pending(u.cohort))
        if set(members) <= waiting:
            self.average(u.cohort)
        else:
            self.send(Progress(device_id=u.device_id, job_id=u.job_id, state="waiting",
                               detail=f"{len(waiting & set(members))} of {len(members)} members' updates are in; "
                                      f"the average follows when all are, or {self.wait:.0f} s after the first"),
                      False)

    def due(self) -> None:
        """Average every cohort whose oldest waiting update is ``wait`` seconds old."""
        if time.monotonic() < self._next_due:
            return
        self._next_due = time.monotonic() + 1.0
        now = time.time()
        for cohort, members in self.registry.cohorts().items():
            first = self.fed.oldest(cohort, members)
            if first is not None and now - first >= self.wait:
                self.average(cohort)

    def average(self, cohort: str) -> int | None:
        if not self.fed.lock(cohort, self.worker_id):
            return None  # another worker forms it
        try:
            members = self.registry.members(cohort)
            taken = self.fed.take(cohort, members)
            task = self.cohorts.task(cohort)
            if not taken or task is None:
                return None
            fingerprint, spec = task
            v = self.cohorts.version(cohort)
            got = self.cohorts.adapter(cohort, v) if v else None
            base = current_weights(got[0] if got else None, taken, spec)
            new = average(base, [decode_weights(p.delta, spec) for p in taken], [p.samples for p in taken],
                          max_share=self.max_share, clip=self.clip, noise_multiplier=self.noise_multiplier)
            version = self.cohorts.next_version(cohort, max([v] + [p.base for p in taken]))
            weights = encode_weights(new, spec)
            metrics: dict[str, float] = {"cohort_members": float(len(taken)),
                                         "samples": float(sum(p.samples for p in taken))}
            if self.noise_multiplier > 0 and self.clip > 0:
                metrics["user_dp_epsilon"] = epsilon(self.noise_multiplier, version)
            self.cohorts.save_adapter(cohort, version, weights, {"job_id": f"cohort-v{version}", "metrics": metrics})
            self.fed.applied(cohort, taken)
            jobs = {p.device: p.job_id for p in taken}
            for m in members:
                self.send(AdapterUpdate(device_id=m, job_id=jobs.get(m, f"cohort-v{version}"), version=version,
                                        base_version=v, backbone_fingerprint=fingerprint, spec=spec, weights=weights,
                                        metrics=metrics), True)
            log.info("cohort %s: v%d averaged from %d updates (%s)", cohort, version, len(taken),
                     ", ".join(f"{p.device} {p.samples}" for p in taken))
            return version
        finally:
            self.fed.unlock(cohort, self.worker_id)

    def _resend_current(self, u: WeightUpdate) -> None:
        update = self.cohorts.current_for(u.cohort, u.device_id, u.base_version, job_id=u.job_id)
        if update is not None:
            self.send(update, True)
