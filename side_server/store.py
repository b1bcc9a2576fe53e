"""Job state in Redis: jobs, the keys each still needs, leases, checkpoints, adapters.

Key space (``dev`` = device id, ``job`` = its job id); none of these expire
while a job is live, so ``volatile-lru`` never evicts them:

* ``st:job:{dev}:{job}``      hash: payload (the encoded Job), digest, state, version
* ``st:need:{dev}:{job}``     set: keys the cache still lacks
* ``st:active``               set of ``dev/job`` not finished (re-announced after a reconnect)
* ``st:ready``                zset of ``dev/job`` whose activations are all cached
* ``st:lease:{dev}:{job}``    the training worker's id (PX lease)
* ``st:ckpt:{dev}:{job}``     safetensors checkpoint (side network + AdamW state)
* ``st:adapter:{dev}:{ver}``  an adapter's weights (kept for warm starts)
* ``st:adapter_ver:{dev}``    the device's latest adapter version
* ``st:status:{dev}``         last status the device sent
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from schemas.jobs import Job
from schemas.wire import decode, encode

DONE_RETENTION = 7 * 24 * 3600

# Create a job in one step: a worker killed half-way must not leave a job without state.
_CREATE = """
if redis.call('hexists', KEYS[1], 'state') == 1 then return 0 end
redis.call('hset', KEYS[1], 'payload', ARGV[1], 'digest', ARGV[2], 'state', 'waiting', 'created', ARGV[3])
redis.call('sadd', KEYS[3], ARGV[4])
for i = 5, #ARGV do redis.call('sadd', KEYS[2], ARGV[i]) end
return 1
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end
"""


@dataclass
class JobRecord:
    job: Job
    state: str
    digest: str
    version: int


def job_digest(job: Job) -> str:
    """What the job asks for, without the envelope (msg id, time): a resend has the same digest."""
    import hashlib

    _, payload = encode(job.model_copy(update={"msg_id": "0" * 32, "sent_at": 0.0}))
    return hashlib.sha256(payload).hexdigest()


class JobStore:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._create = r.register_script(_CREATE)
        self._release = r.register_script(_RELEASE)
        self._renew = r.register_script(_RENEW)

    # ------------------------------------------------------------ jobs

    def create(self, job: Job, missing: list[str]) -> bool:
        """Store a new job; False if it already existed (then nothing changes)."""
        _, payload = encode(job)
        keys = [f"st:job:{job.device_id}:{job.job_id}", f"st:need:{job.device_id}:{job.job_id}", "st:active"]
        args: list[bytes | str | float] = [payload, job_digest(job), time.time(), f"{job.device_id}/{job.job_id}", *missing]
        return bool(self._create(keys=keys, args=args))

    def active(self) -> list[tuple[str, str]]:
        """Jobs not finished yet (any state)."""
        out = []
        for m in cast(set[bytes], self.r.smembers("st:active")):
            dev, _, job = m.decode().partition("/")
            out.append((dev, job))
        return sorted(out)

    def get(self, device: str, job_id: str) -> JobRecord | None:
        h = cast(dict[bytes, bytes], self.r.hgetall(f"st:job:{device}:{job_id}"))
        if not h or b"payload" not in h or b"state" not in h:
            return None
        job = decode(f"sidetune/v1/{device}/jobs", h[b"payload"])
        assert isinstance(job, Job)
        return JobRecord(job, h[b"state"].decode(), h.get(b"digest", b"").decode(), int(h.get(b"version", 0)))

    def set_state(self, device: str, job_id: str, state: str) -> None:
        self.r.hset(f"st:job:{device}:{job_id}", "state", state)

    def need(self, device: str, job_id: str, keys: list[str]) -> None:
        if keys:
            self.r.sadd(f"st:need:{device}:{job_id}", *keys)

    def received(self, device: str, job_id: str, keys: tuple[str, ...]) -> int:
        """Drop keys from the job's need set; how many it still needs."""
        pipe = self.r.pipeline()
        pipe.srem(f"st:need:{device}:{job_id}", *keys)
        pipe.scard(f"st:need:{device}:{job_id}")
        return int(pipe.execute()[1])

    def mark_ready(self, device: str, job_id: str) -> None:
        self.r.zadd("st:ready", {f"{device}/{job_id}": time.time()}, nx=True)

    def unready(self, device: str, job_id: str) -> None:
        self.r.zrem("st:ready", f"{device}/{job_id}")

    def ready(self) -> list[tuple[str, str]]:
        out = []
        for m in cast(list[bytes], self.r.zrange("st:ready", 0, 50)):
            dev, _, job = m.decode().partition("/")
            out.append((dev, job))
        return out

    def finish(self, device: str, job_id: str) -> None:
        self._close(device, job_id, "done")

    def failed_attempt(self, device: str, job_id: str) -> int:
        return int(self.r.hincrby(f"st:job:{device}:{job_id}", "attempts", 1))

    def fail(self, device: str, job_id: str) -> None:
        self._close(device, job_id, "failed")

    def _close(self, device: str, job_id: str, state: str) -> None:
        """End a job: keep its record a while, drop its queue entries, checkpoint and need set."""
        pipe = self.r.pipeline()
        pipe.hset(f"st:job:{device}:{job_id}", "state", state)
        pipe.expire(f"st:job:{device}:{job_id}", DONE_RETENTION)
        pipe.zrem("st:ready", f"{device}/{job_id}")
        pipe.srem("st:active", f"{device}/{job_id}")
        pipe.delete(f"st:ckpt:{device}:{job_id}", f"st:need:{device}:{job_id}")
        pipe.execute()

    # ------------------------------------------------------------ leases

    def lease(self, device: str, job_id: str, worker: str, seconds: float) -> bool:
        return bool(self.r.set(f"st:lease:{device}:{job_id}", worker, nx=True, px=int(seconds * 1000)))

    def renew(self, device: str, job_id: str, worker: str, seconds: float) -> bool:
        return bool(self._renew(keys=[f"st:lease:{device}:{job_id}"], args=[worker, int(seconds * 1000)]))

    def release(self, device: str, job_id: str, worker: str) -> None:
        self._release(keys=[f"st:lease:{device}:{job_id}"], args=[worker])

    # ------------------------------------------------------------ checkpoints and adapters

    def save_checkpoint(self, device: str, job_id: str, blob: bytes) -> None:
        self.r.set(f"st:ckpt:{device}:{job_id}", blob)

    def checkpoint(self, device: str, job_id: str) -> bytes | None:
        b = cast(bytes | None, self.r.get(f"st:ckpt:{device}:{job_id}"))
        return bytes(b) if b is not None else None

    def assign_version(self, device: str, job_id: str) -> int:
        """The adapter version of this job: assigned once, the same after a crash and retry."""
        key = f"st:job:{device}:{job_id}"
        v = self.r.hget(key, "version")
        if v is not None:
            return int(v)
        new = int(self.r.incr(f"st:adapter_ver:{device}"))
        if self.r.hsetnx(key, "version", new):
            return new
        return int(self.r.hget(key, "version") or new)

    def save_adapter(self, device: str, version: int, weights: bytes) -> None:
        self.r.set(f"st:adapter:{device}:{version}", weights)

    def adapter(self, device: str, version: int) -> bytes | None:
        b = cast(bytes | None, self.r.get(f"st:adapter:{device}:{version}"))
        return bytes(b) if b is not None else None

    def save_status(self, device: str, fields: dict[str, str | int | float]) -> None:
        self.r.hset(f"st:status:{device}", mapping=cast(dict[Any, Any], fields))
