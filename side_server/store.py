"""Job state in Redis: the store's own records of jobs, leases, checkpoints, adapters, quotas.

Key space (``dev`` = device id, ``job`` = its job id). The device id is written in braces, a
Redis Cluster hash tag: every key of one device (its jobs, quotas, cache, adapters) sits in one
slot, so every script below touches one slot, and devices spread over the slots (and nodes). A
job's records are split so that an activation batch reads only what it needs (the small
metadata hash and its keys' membership):

* ``st:job:{dev}:job``        hash: state, digest, fingerprint, spec and hyper (JSON), base, n,
                               charge, version, attempts, reason, cohort
* ``st:keys:{dev}:job``       hash: sample key (32 raw bytes) -> its row in the targets
* ``st:targets:{dev}:job``    string: the targets, raw float32 ``(N, K)``
* ``st:need:{dev}:job``       zset: keys (hex) the cache still lacks, scored by their row (the
                               server asks for them in that order, a window at a time)
* ``st:usage:{dev}``          hash: jobs, job_bytes, cache_bytes (the device's quotas in use)
* ``st:lease:{dev}:job``      ``worker|expiry_ms`` of the training worker (no TTL: never evicted)
* ``st:ckpt:{dev}:job``       safetensors checkpoint (side network + AdamW state)
* ``st:adapter:{dev}:ver``    an adapter's weights (the newest few kept for warm starts)
* ``st:adapter_ver:{dev}``    the device's latest adapter version
* ``st:status:{dev}``         last status the device sent
* ``st:rate:{dev}``           the device's token bucket (with a TTL)
* ``st:seen:{dev}``           when the device last sent anything (abandoned jobs)

and three indexes across devices, each one key (one slot) of its own:

* ``st:active``               set of ``dev/job`` not closed (re-announced after a reconnect)
* ``st:ready``                zset of ``dev/job`` whose activations are all cached (score: when)
* ``st:service``              hash: device -> ``seconds when``: training time its jobs got,
                               halved every SERVICE_HALF_LIFE seconds (fair scheduling)

A script never touches an index (it would span two slots in a cluster): the indexes are kept
next to it, in an order that a crash between the two steps cannot make lose a job. A job joins
``st:active`` before its records are written and leaves it after it is closed (a member with
no open job is skipped and cleaned); the job's own state and need set are the truth of its
readiness, ``st:ready`` their index: a job is added once a script reports it ready (a crash
before that leaves its message unacknowledged: redelivered, it is added then), removed once
closed, and, when it waits again for samples gone from the cache, removed and checked again.

No record of a live job carries a TTL, so ``volatile-lru`` never evicts one; a closed job keeps
its small metadata hash for ``closed_job_ttl`` seconds and loses the rest at once.

Writes that create work (a job, cached activations) are Lua scripts that Redis refuses as a
whole when it is at ``maxmemory`` (``OutOfMemoryError``: the caller rejects the message);
writes that keep stored work going (leases, states, checkpoints, closing a job) are scripts
flagged ``allow-oom``, so a full Redis still finishes the jobs it holds.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis

from schemas.jobs import Job
from schemas.spec import HyperParams, SideNetSpec
from schemas.wire import encode

CLOSED = ("done", "failed")
#: A device's training time counts against it in scheduling for about this long (halved each time).
SERVICE_HALF_LIFE = 600.0

_NOW_MS = "local _t = redis.call('time'); local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)\n"

# Create a job in one step, within the device's quotas: all of it or nothing.
# Returns {0} it existed, {-1} too many jobs, {-2} too many bytes, {1} created, {2, when} created and ready.
_CREATE = """#!lua
-- KEYS: job, keys, need, targets, usage
-- ARGV: member, max_jobs, max_bytes, charge, n, n_meta, meta pairs..., targets, n raw keys...,
--       (row, hex key) of each missing key...
if redis.call('hexists', KEYS[1], 'state') == 1 then return {0} end
local usage = redis.call('hmget', KEYS[5], 'jobs', 'job_bytes')
if tonumber(usage[1] or '0') >= tonumber(ARGV[2]) then return {-1} end
local charge = tonumber(ARGV[4])
if tonumber(usage[2] or '0') + charge > tonumber(ARGV[3]) then return {-2} end
redis.call('del', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local i = 7
for j = 1, tonumber(ARGV[6]) do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]); i = i + 2 end
redis.call('set', KEYS[4], ARGV[i]); i = i + 1
local n = tonumber(ARGV[5])
for j = 0, n - 1 do redis.call('hset', KEYS[2], ARGV[i + j], j) end
i = i + n
for j = i, #ARGV, 2 do redis.call('zadd', KEYS[3], ARGV[j], ARGV[j + 1]) end
redis.call('hincrby', KEYS[5], 'jobs', 1)
redis.call('hincrby', KEYS[5], 'job_bytes', charge)
if i > #ARGV then return {2, tonumber(redis.call('time')[1])} end
return {1}
"""
# Close a job: keep its small record a while, drop the rest, give its quota back. Idempotent.
_CLOSE = """#!lua flags=allow-oom
-- KEYS: job, keys, need, targets, ckpt, lease, usage; ARGV: member, state, ttl, reason, only_if
local st = redis.call('hget', KEYS[1], 'state')
if not st or st == 'done' or st == 'failed' then return 0 end
if ARGV[5] ~= '' and st ~= ARGV[5] then return 0 end
local charge = tonumber(redis.call('hget', KEYS[1], 'charge') or '0')
redis.call('hset', KEYS[1], 'state', ARGV[2], 'reason', ARGV[4])
redis.call('expire', KEYS[1], ARGV[3])
redis.call('del', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('hincrby', KEYS[7], 'jobs', -1)
redis.call('hincrby', KEYS[7], 'job_bytes', -charge)
return 1
"""
# Take a job's lease; counts an attempt (a worker killed while training never gives it back).
_LEASE = "#!lua flags=allow-oom\n" + _NOW_MS + """
-- KEYS: lease, job; ARGV: worker, ms. Returns -1 closed, 0 taken by another, else attempts so far
local st = redis.call('hget', KEYS[2], 'state')
if not st or st == 'done' or st == 'failed' then return -1 end
local v = redis.call('get', KEYS[1])
if v then
  local sep = string.find(v, '|', 1, true)
  if sep and tonumber(string.sub(v, sep + 1)) > now and string.sub(v, 1, sep - 1) ~= ARGV[1] then return 0 end
end
redis.call('set', KEYS[1], ARGV[1] .. '|' .. (now + tonumber(ARGV[2])))
return redis.call('hincrby', KEYS[2], 'attempts', 1)
"""
_OWNER = """
local v = redis.call('get', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1] + 1) ~= ARGV[1] .. '|' then return 0 end
"""
_RENEW = "#!lua flags=allow-oom\n" + _NOW_MS + _OWNER + """
redis.call('set', KEYS[1], ARGV[1] .. '|' .. (now + tonumber(ARGV[2])))
return 1
"""
# Give a lease back; a clean end (ARGV[2] = 1) takes back the attempt the lease counted.
_RELEASE = "#!lua flags=allow-oom\n" + _OWNER + """
redis.call('del', KEYS[1])
if ARGV[2] == '1' and tonumber(redis.call('hget', KEYS[2], 'attempts') or '0') > 0 then
  redis.call('hincrby', KEYS[2], 'attempts', -1)
end
return 1
"""
_SAVE_CKPT = "#!lua flags=allow-oom\n" + _OWNER + """
local st = redis.call('hget', KEYS[2], 'state')
if not st or st == 'done' or st == 'failed' then return 0 end
redis.call('set', KEYS[3], ARGV[2])
return 1
"""
_SET_STATE = """#!lua flags=allow-oom
local st = redis.call('hget', KEYS[1], 'state')
if not st or st == 'done' or st == 'failed' then return 0 end
redis.call('hset', KEYS[1], 'state', ARGV[1])
return 1
"""
# Keys received: drop them from the need set; once it is empty the job is ready.
# Returns {-1} closed, else {keys still needed, when it became ready (0: not ready, or training)}.
_RECEIVED = """#!lua flags=allow-oom
-- KEYS: job, need; ARGV: keys...
local st = redis.call('hget', KEYS[1], 'state')
if not st or st == 'done' or st == 'failed' then return {-1, 0} end
for i = 1, #ARGV do redis.call('zrem', KEYS[2], ARGV[i]) end
local left = redis.call('zcard', KEYS[2])
if left == 0 and st == 'waiting' then return {0, tonumber(redis.call('time')[1])} end
return {left, 0}
"""
# Cached samples have gone: the job waits for them again (1: it does now).
_NEED = """#!lua flags=allow-oom
-- KEYS: job, need, keys; ARGV: (raw key, hex key)...
local st = redis.call('hget', KEYS[1], 'state')
if not st or st == 'done' or st == 'failed' then return 0 end
for i = 1, #ARGV, 2 do
  redis.call('zadd', KEYS[2], tonumber(redis.call('hget', KEYS[3], ARGV[i]) or '0'), ARGV[i + 1])
end
if #ARGV == 0 then return 0 end
redis.call('hset', KEYS[1], 'state', 'waiting')
return 1
"""
_SAVE_ADAPTER = """#!lua flags=allow-oom
-- KEYS: adapter, older adapter to drop
redis.call('set', KEYS[1], ARGV[1])
redis.call('del', KEYS[2])
return 1
"""
_VERSION = """#!lua flags=allow-oom
-- KEYS: job, device's version counter
local v = redis.call('hget', KEYS[1], 'version')
if v then return tonumber(v) end
local new = redis.call('incr', KEYS[2])
redis.call('hset', KEYS[1], 'version', new)
return new
"""
# One message from a device: its token bucket (and when it was last heard from).
_RATE = """#!lua flags=allow-oom
-- KEYS: bucket, seen; ARGV: device, rate per s, burst. Returns {allowed, answer the refusal}
local t = redis.call('time')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('set', KEYS[2], tostring(now))
local b = redis.call('hmget', KEYS[1], 'tokens', 'ts', 'told')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
local told = tonumber(b[3]) or 0
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local ok, answer = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
elseif now - told >= 1 then
  answer = 1
  told = now
end
redis.call('hset', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now), 'told', tostring(told))
redis.call('pexpire', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {ok, answer}
"""


# Add a slice's seconds to a device's decayed training time.
_CHARGE = """#!lua flags=allow-oom
-- KEYS: service; ARGV: device, seconds, half life
local t = redis.call('time')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('hget', KEYS[1], ARGV[1])
local s = 0
if v then
  local sep = string.find(v, ' ', 1, true)
  s = tonumber(string.sub(v, 1, sep - 1)) * math.pow(0.5, math.max(0, now - tonumber(string.sub(v, sep + 1))) / tonumber(ARGV[3]))
end
redis.call('hset', KEYS[1], ARGV[1], tostring(s + tonumber(ARGV[2])) .. ' ' .. tostring(now))
return 1
"""


@dataclass(frozen=True)
class JobRecord:
    """What the store keeps of a job (not the wire message)."""

    device: str
    job_id: str
    state: str
    digest: str
    version: int
    fingerprint: str
    spec: SideNetSpec
    hyper: HyperParams
    base_version: int
    samples: int
    attempts: int
    reason: str
    #: The cohort the job's samples are pooled in ("" : the device trains alone).
    cohort: str = ""

    @property
    def closed(self) -> bool:
        return self.state in CLOSED


class QuotaFull(Exception):
    """A job did not fit: ``which`` is ``jobs`` (too many in flight) or ``bytes`` (records)."""

    def __init__(self, which: str, used: int) -> None:
        super().__init__(which)
        self.which = which
        self.used = used


def job_digest(job: Job) -> str:
    """What the job asks for, without the envelope (msg id, time): a resend has the same digest."""
    _, payload = encode(job.model_copy(update={"msg_id": "0" * 32, "sent_at": 0.0}))
    return hashlib.sha256(payload).hexdigest()


def _member(device: str, job_id: str) -> str:
    return f"{device}/{job_id}"


def key(kind: str, device: str, job_id: str | int | None = None) -> str:
    """The name of one of a device's keys: ``st:<kind>:{<device>}[:<job id or version>]``. The braces
    are a Redis Cluster hash tag: all of a device's keys share its slot."""
    return f"st:{kind}:{{{device}}}" if job_id is None else f"st:{kind}:{{{device}}}:{job_id}"


_k = key
ACTIVE, READY, SERVICE = "st:active", "st:ready", "st:service"


class JobStore:
    def __init__(self, r: redis.Redis, closed_ttl: int = 7 * 24 * 3600, adapters_kept: int = 3) -> None:
        self.r = r
        self.closed_ttl = closed_ttl
        self.adapters_kept = adapters_kept
        self._create = r.register_script(_CREATE)
        self._close_script = r.register_script(_CLOSE)
        self._lease = r.register_script(_LEASE)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)
        self._save_ckpt = r.register_script(_SAVE_CKPT)
        self._set_state = r.register_script(_SET_STATE)
        self._received = r.register_script(_RECEIVED)
        self._need = r.register_script(_NEED)
        self._save_adapter = r.register_script(_SAVE_ADAPTER)
        self._version = r.register_script(_VERSION)
        self._rate = r.register_script(_RATE)
        self._charge = r.register_script(_CHARGE)

    # ------------------------------------------------------------ jobs

    def create(self, job: Job, missing: list[str], charge: int, max_jobs: int, max_bytes: int) -> bool:
        """Store a new job within its device's quotas; False if it already existed (nothing changes).

        Raises :class:`QuotaFull` (nothing stored) when the device has too many jobs in flight
        or their records would pass ``max_bytes``; ``redis.OutOfMemoryError`` when Redis is full."""
        dev, jid = job.device_id, job.job_id
        meta: dict[str, str | int | float] = {
            "state": "waiting", "digest": job_digest(job), "created": time.time(),
            "fingerprint": job.backbone_fingerprint, "spec": job.spec.model_dump_json(),
            "hyper": job.hyper.model_dump_json(), "base": job.base_adapter_version, "n": len(job.keys),
            "charge": charge, "attempts": 0, "cohort": job.cohort or "",
        }
        keys = [_k("job", dev, jid), _k("keys", dev, jid), _k("need", dev, jid), _k("targets", dev, jid),
                _k("usage", dev)]
        args: list[Any] = [_member(dev, jid), max_jobs, max_bytes, charge, len(job.keys), len(meta)]
        for name, value in meta.items():
            args += [name, value]
        args.append(job.targets.data)  # float32 (N, K), little-endian, as it travelled
        args += [bytes.fromhex(k) for k in job.keys]
        row = {k: i for i, k in enumerate(job.keys)}
        for k in missing:
            args += [row[k], k]
        member = _member(dev, jid)
        self.r.sadd(ACTIVE, member)  # first: a crash after the script must not leave a job out of the index
        try:
            got = cast(list[int], self._create(keys=keys, args=args))
        except BaseException:
            self._unindex_unless_open(dev, jid)
            raise
        if got[0] == 2:
            self.r.zadd(READY, {member: got[1]}, nx=True)
        elif got[0] < 0:
            self._unindex_unless_open(dev, jid)
            used = self.usage(dev)
            raise QuotaFull("jobs" if got[0] == -1 else "bytes", used["jobs" if got[0] == -1 else "job_bytes"])
        return got[0] > 0

    def _unindex_unless_open(self, device: str, job_id: str) -> None:
        """Take a job that was not created out of ``st:active`` (unless a twin delivery created it
        meanwhile: checked after the removal, so the two cannot miss each other)."""
        member = _member(device, job_id)
        self.r.srem(ACTIVE, member)
        if self._open(device, job_id):
            self.r.sadd(ACTIVE, member)

    def get(self, device: str, job_id: str) -> JobRecord | None:
        h = cast(dict[bytes, bytes], self.r.hgetall(_k("job", device, job_id)))
        if not h or b"state" not in h or b"spec" not in h:
            return None
        return JobRecord(
            device, job_id, h[b"state"].decode(), h.get(b"digest", b"").decode(), int(h.get(b"version", 0)),
            h[b"fingerprint"].decode(), SideNetSpec.model_validate_json(h[b"spec"]),
            HyperParams.model_validate_json(h[b"hyper"]), int(h.get(b"base", 0)), int(h[b"n"]),
            int(h.get(b"attempts", 0)), h.get(b"reason", b"").decode(), h.get(b"cohort", b"").decode())

    def keys(self, device: str, job_id: str) -> list[str]:
        """The job's sample keys (hex), in the order of its targets."""
        h = cast(dict[bytes, bytes], self.r.hgetall(_k("keys", device, job_id)))
        order = sorted(h.items(), key=lambda kv: int(kv[1]))
        return [k.hex() for k, _ in order]

    def stray(self, device: str, job_id: str, keys: tuple[str, ...]) -> list[str]:
        """Those of ``keys`` that are not the job's."""
        rows = cast(list[bytes | None], self.r.hmget(_k("keys", device, job_id), [bytes.fromhex(k) for k in keys]))
        return [k for k, row in zip(keys, rows) if row is None]

    def targets(self, device: str, job_id: str, rec: JobRecord) -> np.ndarray | None:
        blob = cast(bytes | None, self.r.get(_k("targets", device, job_id)))
        if blob is None or len(blob) != 4 * rec.samples * rec.spec.out_dim:
            return None
        return np.frombuffer(blob, "<f4").reshape(rec.samples, rec.spec.out_dim).astype(np.float32)

    def active(self) -> list[tuple[str, str]]:
        """Jobs not closed yet (any state)."""
        out = []
        for m in cast(set[bytes], self.r.smembers(ACTIVE)):
            dev, _, job = m.decode().partition("/")
            out.append((dev, job))
        return sorted(out)

    def usage(self, device: str) -> dict[str, int]:
        h = cast(dict[bytes, bytes], self.r.hgetall(_k("usage", device)))
        return {k: int(h.get(k.encode(), 0)) for k in ("jobs", "job_bytes", "cache_bytes")}

    def set_state(self, device: str, job_id: str, state: str) -> None:
        self._set_state(keys=[_k("job", device, job_id)], args=[state])

    def need(self, device: str, job_id: str, keys: list[str]) -> None:
        """The job lacks these keys (again): it waits for them."""
        pairs: list[Any] = []
        for k in keys:
            pairs += [bytes.fromhex(k), k]
        if keys and self._need(keys=[_k("job", device, job_id), _k("need", device, job_id),
                                     _k("keys", device, job_id)], args=pairs):
            self.r.zrem(READY, _member(device, job_id))
            # a batch that cached the last of them on another worker may have marked it ready
            # between the script and the ZREM: look again (after the ZREM, so one of us sees it)
            self.received(device, job_id, [])

    def received(self, device: str, job_id: str, keys: tuple[str, ...] | list[str]) -> int:
        """Drop keys from the job's need set (the job is ready once it is empty); how many it still
        needs, -1 if the job is closed."""
        left, since = cast(list[int], self._received(keys=[_k("job", device, job_id), _k("need", device, job_id)],
                                                     args=list(keys)))
        if left == 0 and since:
            self.r.zadd(READY, {_member(device, job_id): since}, nx=True)
        return int(left)

    def window(self, device: str, job_id: str, limit: int) -> list[str]:
        """The first ``limit`` keys the job still needs, in the job's order: what the server asks
        the device for now (the keys of batches in flight among them: the device does not send
        a key twice within a while). Asking a window at a time bounds what a device has in the
        broker's queue for the workers (see ``upload_window_bytes``)."""
        return [k.decode() for k in cast(list[bytes], self.r.zrange(_k("need", device, job_id), 0, limit - 1))]

    def unready(self, device: str, job_id: str) -> None:
        self.r.zrem(READY, _member(device, job_id))

    def ready(self) -> list[tuple[str, str, float]]:
        """Jobs whose samples are all cached (being trained or not): device, job, since when."""
        out = []
        for m, score in cast(list[tuple[bytes, float]], self.r.zrange(READY, 0, -1, withscores=True)):
            dev, _, job = m.decode().partition("/")
            out.append((dev, job, score))
        return out

    def finish(self, device: str, job_id: str) -> None:
        self._close(device, job_id, "done", "")

    def fail(self, device: str, job_id: str, reason: str) -> None:
        self._close(device, job_id, "failed", reason)

    def abandon(self, device: str, job_id: str, reason: str) -> bool:
        """Close a job that still waits for its device's uploads (not one being trained); a member
        of ``st:active`` whose job is closed or gone already is dropped from the index."""
        if self._close(device, job_id, "failed", reason, only_if="waiting"):
            return True
        self.forget(device, job_id)
        return False

    def _close(self, device: str, job_id: str, state: str, reason: str, only_if: str = "") -> bool:
        keys = [_k(k, device, job_id) for k in ("job", "keys", "need", "targets", "ckpt", "lease")]
        keys.append(_k("usage", device))
        closed = bool(self._close_script(keys=keys, args=[_member(device, job_id), state, self.closed_ttl,
                                                          reason[:2000], only_if]))
        if closed or not only_if:  # after the records: a crash in between leaves a closed member, skipped
            member = _member(device, job_id)
            self.r.zrem(READY, member)
            self.r.srem(ACTIVE, member)
        return closed

    def forget(self, device: str, job_id: str) -> None:
        """Drop a member of ``st:active`` whose job is closed or gone (a step a crash left undone)."""
        member = _member(device, job_id)
        if self._open(device, job_id):
            return
        self.r.srem(ACTIVE, member)
        self.r.zrem(READY, member)
        if self._open(device, job_id):  # created just now (its device is back): keep it indexed
            self.r.sadd(ACTIVE, member)
            self.received(device, job_id, [])

    def _open(self, device: str, job_id: str) -> bool:
        st = cast(bytes | None, self.r.hget(_k("job", device, job_id), "state"))
        return st is not None and st.decode() not in CLOSED

    # ------------------------------------------------------------ devices

    def allow_message(self, device: str, rate: float, burst: int) -> tuple[bool, bool]:
        """Take a token from the device's bucket: (allowed, whether to answer a refusal)."""
        ok, answer = cast(list[int], self._rate(keys=[_k("rate", device), _k("seen", device)],
                                                args=[device, rate, burst]))
        return bool(ok), bool(answer)

    def silent_since(self, devices: list[str]) -> dict[str, float]:
        """When each device was last heard from (0: never)."""
        seen = self._get_each([_k("seen", d) for d in devices])
        return {d: float(s or 0.0) for d, s in zip(devices, seen)}

    def _get_each(self, names: list[str]) -> list[bytes | None]:
        """GET of keys that may sit in different slots: a pipeline (one round trip per node)."""
        out: list[bytes | None] = []
        for start in range(0, len(names), 1000):
            pipe = self.r.pipeline(transaction=False)
            for name in names[start : start + 1000]:
                pipe.get(name)
            out += cast(list[bytes | None], pipe.execute())
        return out

    def service(self, devices: list[str]) -> dict[str, float]:
        """Each device's recent training time (seconds, decayed by SERVICE_HALF_LIFE)."""
        if not devices:
            return {}
        now = float(self.r.time()[0])
        out = {}
        for d, v in zip(devices, cast(list[bytes | None], self.r.hmget(SERVICE, devices))):
            s, _, when = (v or b"0 0").decode().partition(" ")
            out[d] = float(s) * 0.5 ** (max(0.0, now - float(when or 0)) / SERVICE_HALF_LIFE)
        return out

    def charge_service(self, device: str, seconds: float) -> None:
        self._charge(keys=[SERVICE], args=[device, seconds, SERVICE_HALF_LIFE])

    # ------------------------------------------------------------ leases

    def lease(self, device: str, job_id: str, worker: str, seconds: float) -> int:
        """-1: the job is closed; 0: another worker holds it; else the attempts counted so far (this one too)."""
        return int(self._lease(keys=[_k("lease", device, job_id), _k("job", device, job_id)],
                               args=[worker, int(seconds * 1000)]))

    def renew(self, device: str, job_id: str, worker: str, seconds: float) -> bool:
        return bool(self._renew(keys=[_k("lease", device, job_id)], args=[worker, int(seconds * 1000)]))

    def release(self, device: str, job_id: str, worker: str, clean: bool = True) -> None:
        """Give the lease back; ``clean``: the slice ended as planned (the attempt does not count)."""
        self._release(keys=[_k("lease", device, job_id), _k("job", device, job_id)], args=[worker, int(clean)])

    def leased(self, members: list[tuple[str, str]]) -> list[bool]:
        """Whether each job's lease is held now."""
        if not members:
            return []
        now = int(self.r.time()[0]) * 1000
        out = []
        for v in self._get_each([_k("lease", d, j) for d, j in members]):
            held = False
            if v is not None:
                _, _, exp = v.decode().rpartition("|")
                held = exp.isdigit() and int(exp) > now
            out.append(held)
        return out

    # ------------------------------------------------------------ checkpoints and adapters

    def save_checkpoint(self, device: str, job_id: str, worker: str, blob: bytes) -> bool:
        """Stored only while ``worker`` holds the lease of a job still open."""
        return bool(self._save_ckpt(keys=[_k("lease", device, job_id), _k("job", device, job_id),
                                          _k("ckpt", device, job_id)], args=[worker, blob]))

    def checkpoint(self, device: str, job_id: str) -> bytes | None:
        b = cast(bytes | None, self.r.get(_k("ckpt", device, job_id)))
        return bytes(b) if b is not None else None

    def assign_version(self, device: str, job_id: str) -> int:
        """The adapter version of this job: assigned once, the same after a crash and retry."""
        return int(self._version(keys=[_k("job", device, job_id), _k("adapter_ver", device)]))

    def set_version(self, device: str, job_id: str, version: int) -> int:
        """Give the job this adapter version unless it has one already (a cohort's numbering);
        returns the job's version."""
        self.r.hsetnx(_k("job", device, job_id), "version", version)
        return int(cast(bytes, self.r.hget(_k("job", device, job_id), "version")) or version)

    def save_adapter(self, device: str, version: int, weights: bytes) -> None:
        """Keep the device's newest ``adapters_kept`` adapters (warm starts), drop the one before."""
        self._save_adapter(keys=[_k("adapter", device, version), _k("adapter", device, version - self.adapters_kept)],
                           args=[weights])

    def adapter(self, device: str, version: int) -> bytes | None:
        b = cast(bytes | None, self.r.get(_k("adapter", device, version)))
        return bytes(b) if b is not None else None

    def save_status(self, device: str, fields: dict[str, str | int | float]) -> None:
        self.r.hset(_k("status", device), mapping=cast(dict[Any, Any], fields))

