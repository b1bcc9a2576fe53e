"""What the operator's views show of the fleet, kept in Redis: the writer (the workers) and the readers.

``sidetune fleet`` and the dashboard read ONLY through :func:`fleet_snapshot`, :func:`device_detail` and
:func:`job_detail` (their shape: the README's "Seeing the fleet", and ``sidetune fleet --json``). The workers
write through :class:`FleetLog`; a write that fails (Redis full or away) is dropped: these records
are for people to look at, never what a job depends on.

Key space (every per-device key carries the device id as a Redis Cluster hash tag, so a device's
records share one slot; each command touches one key):

* ``sidetune:fleet:devices``                  zset: device -> when last heard of (status, job, rejection)
* ``sidetune:fleet:jobs``                     zset: ``dev/job`` -> created (the newest JOBS_KEPT)
* ``sidetune:fleet:limits``                   hash: the quota limits the workers run with
* ``sidetune:fleet:rejection_minutes``        zset: minute start -> minute start (the buckets that exist)
* ``sidetune:fleet:rejections:<minute>``      hash: code -> rejections in that minute (expires after a day)
* ``sidetune:fleet:{dev}:status``             hash: the device's last status (state, versions, fingerprint)
* ``sidetune:fleet:{dev}:rounds``             zset: round number -> ROUND JSON (the newest ROUNDS_KEPT)
* ``sidetune:fleet:{dev}:jobs``               zset: job id -> created (the newest DEVICE_JOBS_KEPT)
* ``sidetune:fleet:{dev}:job:{job}``          hash: state, created_at, finished_at, samples, epochs, ...
* ``sidetune:fleet:{dev}:losses:{job}``       hash: epoch -> LOSS JSON (an epoch trained twice after a crash
                                               keeps one entry)
* ``sidetune:fleet:{dev}:rejections``         hash: code -> rejections in all
* ``sidetune:fleet:{dev}:last_rejections``    list: REJECTION JSON, newest first (LAST_REJECTIONS)

Every key carries a TTL (``RETENTION``, renewed at each write; the minute buckets a day), so Redis's
``volatile-lru`` may evict them before any job record, and a device gone for a month leaves nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, cast

import redis

from side_server.cache import ActivationCache
from side_server.store import JobStore

log = logging.getLogger("sidetune.server.fleet")

PREFIX = "sidetune:fleet"
#: How long a device's records live after their last write (seconds).
RETENTION = 30 * 24 * 3600
ROUNDS_KEPT = 50
DEVICE_JOBS_KEPT = 50
JOBS_KEPT = 200
LAST_REJECTIONS = 20
DEVICES_KEPT = 10_000
#: Epochs kept per job (a job has at most 1000: schemas/spec.py).
LOSSES_KEPT = 1000
#: The rejection-over-time window, and how long a minute bucket lives.
REJECTION_WINDOW = 24 * 3600
BUCKET_TTL = REJECTION_WINDOW + 3600

DEVICES = f"{PREFIX}:devices"
JOBS = f"{PREFIX}:jobs"
LIMITS = f"{PREFIX}:limits"
REJECTION_MINUTES = f"{PREFIX}:rejection_minutes"

#: What a fleet write drops: Redis's errors, and a cluster's own (not a RedisError in redis-py).
STORE_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)

__all__ = ["FleetLog", "device_detail", "fleet_snapshot", "job_detail"]


def _dk(device: str, what: str) -> str:
    return f"{PREFIX}:{{{device}}}:{what}"


def _minute_key(minute: int) -> str:
    return f"{PREFIX}:rejections:{minute}"


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def _f(v: bytes | str | None) -> float | None:
    if v is None or v in (b"", ""):
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _i(v: bytes | str | None, default: int = 0) -> int:
    x = _f(v)
    return int(x) if x is not None else default


# --------------------------------------------------------------------------- writing (the workers)


class FleetLog:
    """The workers' writes. Each method is best effort: a Redis error is logged and dropped."""

    def __init__(self, r: redis.Redis, retention: int = RETENTION) -> None:
        self.r = r
        self.retention = retention
        self._warned = 0.0

    def _dropped(self, what: str, e: Exception) -> None:
        now = time.monotonic()
        if now - self._warned > 60:  # at most one line a minute: Redis away is logged elsewhere
            self._warned = now
            log.warning("fleet record of %s not stored: %s", what, e)

    def _seen(self, pipe: Any, device: str, at: float) -> None:
        pipe.zadd(DEVICES, {device: at}, gt=True)  # GT still adds a new member
        pipe.zremrangebyrank(DEVICES, 0, -(DEVICES_KEPT + 1))
        pipe.expire(DEVICES, self.retention)

    def limits(self, cache_bytes: int, jobs_in_flight: int) -> None:
        """The quota limits the views show use against (written by each worker at start)."""
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(LIMITS, mapping={"cache_bytes": cache_bytes, "jobs_in_flight": jobs_in_flight})
            pipe.expire(LIMITS, self.retention)
            pipe.execute()
        except STORE_ERRORS as e:
            self._dropped("the limits", e)

    def status(self, device: str, state: str, agent_version: str, adapter_version: int,
               backbone_fingerprint: str | None, at: float, last_round: dict[str, Any] | None = None) -> None:
        """A status the device published (retained: also what a worker gets on subscribing)."""
        try:
            pipe = self.r.pipeline(transaction=False)
            key = _dk(device, "status")
            pipe.hset(key, mapping={"state": state, "agent_version": agent_version,
                                    "adapter_version": adapter_version,
                                    "backbone_fingerprint": backbone_fingerprint or "", "at": at})
            pipe.expire(key, self.retention)
            self._seen(pipe, device, at)
            pipe.execute()
            if last_round is not None:
                self.round(device, last_round)
        except STORE_ERRORS as e:
            self._dropped(f"the status of {device}", e)

    def round(self, device: str, summary: dict[str, Any]) -> None:
        """A round the board reported (each status repeats the last one: kept once per round number)."""
        n = int(summary["round"])
        key = _dk(device, "rounds")
        entry = json.dumps({"round": n, "samples": int(summary.get("samples", 0)),
                            "forward_passes": int(summary.get("forward_passes", 0)),
                            "bytes_up": int(summary.get("bytes_up", 0)), "bytes_down": int(summary.get("bytes_down", 0)),
                            "seconds": float(summary.get("seconds", 0.0)),
                            "holdout_accuracy": summary.get("holdout_accuracy"),
                            "adapter_version": int(summary.get("adapter_version", 0)),
                            "at": float(summary.get("finished_at") or summary.get("at") or time.time())},
                           sort_keys=True)
        try:
            pipe = self.r.pipeline(transaction=True)  # one key: one slot
            pipe.zremrangebyscore(key, n, n)
            pipe.zadd(key, {entry: n})
            pipe.zremrangebyrank(key, 0, -(ROUNDS_KEPT + 1))
            pipe.expire(key, self.retention)
            pipe.execute()
        except STORE_ERRORS as e:
            self._dropped(f"round {n} of {device}", e)

    def job(self, device: str, job_id: str, *, samples: int, epochs: int, created_at: float | None = None) -> None:
        """A new job (state waiting)."""
        at = created_at if created_at is not None else time.time()
        key = _dk(device, f"job:{job_id}")
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hsetnx(key, "created_at", at)
            pipe.hsetnx(key, "state", "waiting")
            pipe.hset(key, mapping={"samples": samples, "epochs": epochs})
            pipe.expire(key, self.retention)
            jobs = _dk(device, "jobs")
            pipe.zadd(jobs, {job_id: at}, nx=True)
            pipe.zremrangebyrank(jobs, 0, -(DEVICE_JOBS_KEPT + 1))
            pipe.expire(jobs, self.retention)
            pipe.zadd(JOBS, {f"{device}/{job_id}": at}, nx=True)
            pipe.zremrangebyrank(JOBS, 0, -(JOBS_KEPT + 1))
            pipe.expire(JOBS, self.retention)
            self._seen(pipe, device, at)
            pipe.execute()
        except STORE_ERRORS as e:
            self._dropped(f"job {device}/{job_id}", e)

    def job_state(self, device: str, job_id: str, state: str, *, reason: str = "",
                  adapter_version: int | None = None) -> None:
        """A job's new state; a closed one (done, failed) gets its finishing time."""
        key = _dk(device, f"job:{job_id}")
        fields: dict[str, str | int | float] = {"state": state}
        if state in ("done", "failed"):
            fields["finished_at"] = time.time()
        if reason:
            fields["reason"] = reason[:500]
        if adapter_version is not None:
            fields["adapter_version"] = adapter_version
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(key, mapping=cast(dict[Any, Any], fields))
            pipe.expire(key, self.retention)
            pipe.execute()
        except STORE_ERRORS as e:
            self._dropped(f"job {device}/{job_id}", e)

    def created_at(self, device: str, job_id: str) -> float | None:
        try:
            return _f(cast(bytes | None, self.r.hget(_dk(device, f"job:{job_id}"), "created_at")))
        except STORE_ERRORS:
            return None

    def epoch(self, device: str, job_id: str, epoch: int, train_loss: float, val_loss: float | None) -> None:
        """One epoch trained (the loss curve)."""
        entry = json.dumps({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "at": time.time()})
        try:
            pipe = self.r.pipeline(transaction=False)
            losses = _dk(device, f"losses:{job_id}")
            if epoch <= LOSSES_KEPT:
                pipe.hset(losses, str(epoch), entry)
            pipe.expire(losses, self.retention)
            key = _dk(device, f"job:{job_id}")
            # one trainer per job: its epochs come in order (after a crash, again from its checkpoint's)
            pipe.hset(key, mapping={"state": "training", "epochs_done": epoch, "train_loss": train_loss})
            pipe.expire(key, self.retention)
            pipe.execute()  # one round trip per epoch
        except STORE_ERRORS as e:
            self._dropped(f"epoch {epoch} of {device}/{job_id}", e)

    def rejection(self, device: str | None, code: str, reason: str, count: int = 1) -> None:
        """``count`` messages rejected with ``code`` (``device`` None: the topic named none);
        ``reason`` is the last one's."""
        now = time.time()
        minute = int(now // 60) * 60
        try:
            pipe = self.r.pipeline(transaction=False)
            bucket = _minute_key(minute)
            pipe.hincrby(bucket, code, count)
            pipe.expire(bucket, BUCKET_TTL)
            pipe.zadd(REJECTION_MINUTES, {str(minute): minute})
            pipe.zremrangebyscore(REJECTION_MINUTES, "-inf", minute - BUCKET_TTL)
            pipe.expire(REJECTION_MINUTES, BUCKET_TTL)
            if device is not None:
                totals = _dk(device, "rejections")
                pipe.hincrby(totals, code, count)
                pipe.expire(totals, self.retention)
                last = _dk(device, "last_rejections")
                pipe.lpush(last, json.dumps({"code": code, "reason": reason[:500], "at": now}))
                pipe.ltrim(last, 0, LAST_REJECTIONS - 1)
                pipe.expire(last, self.retention)
                self._seen(pipe, device, now)
            pipe.execute()
        except STORE_ERRORS as e:
            self._dropped(f"a rejection ({code})", e)


# --------------------------------------------------------------------------- reading (the views)


def _losses(r: redis.Redis, device: str, job_id: str) -> list[dict[str, Any]]:
    raw = cast(dict[bytes, bytes], r.hgetall(_dk(device, f"losses:{job_id}")))
    out = []
    for v in raw.values():
        try:
            out.append(json.loads(v))
        except ValueError:
            continue
    return sorted(out, key=lambda x: x.get("epoch", 0))


def _job(r: redis.Redis, device: str, job_id: str, *, with_losses: bool = True) -> dict[str, Any] | None:
    h = cast(dict[bytes, bytes], r.hgetall(_dk(device, f"job:{job_id}")))
    if not h:
        return None
    epochs = _i(h.get(b"epochs"), 0)
    out: dict[str, Any] = {
        "device": device, "job_id": job_id, "state": _s(h.get(b"state")) or "unknown",
        "created_at": _f(h.get(b"created_at")), "finished_at": _f(h.get(b"finished_at")),
        "samples": _i(h.get(b"samples")), "epochs_done": _i(h.get(b"epochs_done")), "epochs": epochs or None,
        "adapter_version": _i(h.get(b"adapter_version")) or None, "reason": _s(h.get(b"reason")) or None,
        "train_loss": _f(h.get(b"train_loss")),
    }
    out["losses"] = _losses(r, device, job_id) if with_losses else []
    return out


def _rounds(r: redis.Redis, device: str) -> list[dict[str, Any]]:
    out = []
    for v in cast(list[bytes], r.zrange(_dk(device, "rounds"), 0, -1)):
        try:
            out.append(json.loads(v))
        except ValueError:
            continue
    return out


def _limits(r: redis.Redis) -> dict[str, int]:
    from side_server.config import Quotas

    q = Quotas()
    h = cast(dict[bytes, bytes], r.hgetall(LIMITS))
    return {"cache_bytes": _i(h.get(b"cache_bytes"), q.cache_bytes),
            "jobs_in_flight": _i(h.get(b"jobs_in_flight"), q.jobs_in_flight)}


def _device(r: redis.Redis, device: str, last_seen: float | None, limits: dict[str, int], jobs_kept: int,
            store: JobStore, cache: ActivationCache) -> dict[str, Any]:
    st = cast(dict[bytes, bytes], r.hgetall(_dk(device, "status")))
    heard = store.silent_since([device]).get(device) or None
    seen = max((x for x in (last_seen, heard, _f(st.get(b"at"))) if x), default=None)
    rounds = _rounds(r, device)
    job_ids = [j.decode() for j in cast(list[bytes], r.zrevrange(_dk(device, "jobs"), 0, jobs_kept - 1))]
    jobs = [j for j in (_job(r, device, jid) for jid in job_ids) if j is not None]
    rejections = {k.decode(): int(v) for k, v in cast(dict[bytes, bytes], r.hgetall(_dk(device, "rejections"))).items()}
    last_rej = []
    for v in cast(list[bytes], r.lrange(_dk(device, "last_rejections"), 0, LAST_REJECTIONS - 1)):
        try:
            last_rej.append(json.loads(v))
        except ValueError:
            continue
    usage = store.usage(device)
    return {
        "device": device, "online": _s(st.get(b"state")) == "online",
        "agent_version": _s(st.get(b"agent_version")) or None,
        "backbone_fingerprint": _s(st.get(b"backbone_fingerprint")) or None,
        "adapter_version": _i(st.get(b"adapter_version")),
        "last_seen": seen, "status_at": _f(st.get(b"at")),
        "last_round": rounds[-1] if rounds else None, "rounds": rounds, "jobs": jobs,
        "rejections": rejections, "last_rejections": last_rej,
        "cache_bytes": usage["cache_bytes"], "cache_samples": cache.samples(device),
        "quota": {"cache_bytes": {"used": usage["cache_bytes"], "limit": limits["cache_bytes"]},
                  "jobs_in_flight": {"used": usage["jobs"], "limit": limits["jobs_in_flight"]}},
    }


def _rejections_over_time(r: redis.Redis, now: float) -> list[dict[str, Any]]:
    start = now - REJECTION_WINDOW
    minutes = [int(m) for m in cast(list[bytes], r.zrangebyscore(REJECTION_MINUTES, start - 60, "+inf"))]
    out = []
    for m in sorted(minutes):
        if m + 60 <= start:
            continue
        for code, count in sorted(cast(dict[bytes, bytes], r.hgetall(_minute_key(m))).items()):
            out.append({"at": float(m), "code": code.decode(), "count": int(count)})
    return out


def _stores(r: redis.Redis) -> tuple[JobStore, ActivationCache]:
    return JobStore(r), ActivationCache(r, ttl=1)


def fleet_snapshot(r: redis.Redis) -> dict[str, Any]:
    """Every device heard of, its rounds, jobs and rejections; the newest jobs of all; rejections
    per minute and code over the last day. Exactly what ``sidetune fleet --json`` prints."""
    now = time.time()
    store, cache = _stores(r)
    limits = _limits(r)
    devices = [(d.decode(), float(s)) for d, s in
               cast(list[tuple[bytes, float]], r.zrange(DEVICES, 0, -1, withscores=True))]
    out_devices = [_device(r, d, s, limits, DEVICE_JOBS_KEPT, store, cache) for d, s in sorted(devices)]
    jobs = []
    for m in cast(list[bytes], r.zrevrange(JOBS, 0, JOBS_KEPT - 1)):
        dev, _, jid = m.decode().partition("/")
        j = _job(r, dev, jid)
        if j is not None:
            jobs.append(j)
    return {"generated_at": now, "devices": out_devices, "jobs": jobs,
            "rejections_over_time": _rejections_over_time(r, now)}


def device_detail(r: redis.Redis, device_id: str) -> dict[str, Any] | None:
    """One device as in the snapshot's ``devices`` (with all its jobs kept); None if never heard of."""
    score = cast(float | None, r.zscore(DEVICES, device_id))
    if score is None and not r.exists(_dk(device_id, "status")):
        return None
    store, cache = _stores(r)
    return _device(r, device_id, score, _limits(r), DEVICE_JOBS_KEPT, store, cache)


def job_detail(r: redis.Redis, device_id: str, job_id: str) -> dict[str, Any] | None:
    """One job with its loss per epoch; None if unknown (or expired)."""
    return _job(r, device_id, job_id)
