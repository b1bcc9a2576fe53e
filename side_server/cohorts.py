"""Cohorts on the server: who is a member (the operator's registry), and each cohort's pool.

A cohort is a set of boards an operator declared to share a task (`sidetune broker add-device
ID --cohort NAME`, `sidetune broker set-cohort`): the broker folder's ``cohorts.json`` maps
each member device to its cohort, and every worker reads it (``cohorts_file`` in server.toml;
re-read when it changes). The server pools a job's samples only if the registry and the job
agree (the board names the cohort it mixes its targets for; a board that names a cohort it is
not a member of is rejected with ``not_member``), and only for the cohort's task: the backbone
fingerprint and side-network spec of the first member's job bind the cohort, and a job of
another task is rejected with ``cohort_mismatch``.

Key space (hash tag ``{cohort/NAME}``: a device id cannot hold ``/``, so no device's slot is
shared; every key of one cohort sits in one slot):

* ``st:cohort:{cohort/NAME}``            hash: fingerprint, spec (JSON) of the cohort's task
* ``st:pool:{cohort/NAME}``              hash: member device -> its job in the pool
* ``st:pooled:{cohort/NAME}:<device>``   hash: job, n, keys (32 raw bytes each), targets (float32)
* ``st:cadapter_ver:{cohort/NAME}``      the cohort's latest adapter version
* ``st:cadapter:{cohort/NAME}:<ver>``    its weights (the newest ``adapters_kept``)

A member's entry is its latest job whose samples are all cached (a board's job holds every
sample it has, so the latest one is all of it); the samples themselves stay in the member's
own cache (``st:act:{device}:...``), read when the cohort trains. Each member's share of the
loss is capped (:func:`member_weights`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis

from schemas.adapter import AdapterUpdate
from schemas.errors import ConfigurationError
from schemas.spec import SideNetSpec
from schemas.topics import check_device_id

log = logging.getLogger("sidetune.server")

#: How often (seconds) a worker looks whether the registry file changed.
RELOAD_EVERY = 1.0


class CohortRegistry:
    """The operator's word on membership: ``{"devices": {device: cohort}}`` in a JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime: float | None = None
        self._checked = 0.0
        self._devices: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._devices, self._mtime = {}, None
            return
        if st.st_mtime == self._mtime:
            return
        try:
            data = json.loads(self.path.read_text())
            devices = data.get("devices", {}) if isinstance(data, dict) else None
            if not isinstance(devices, dict):
                raise ValueError("no 'devices' object")
            for dev, name in devices.items():
                check_device_id(dev)
                check_device_id(name)
        except (OSError, ValueError) as e:
            if self._mtime is None and not self._devices:
                raise ConfigurationError(f"cannot read the cohort registry {self.path}: {e}") from None
            log.error("cohort registry %s unreadable (%s); keeping the members read before", self.path, e)
            self._mtime = st.st_mtime
            return
        self._devices, self._mtime = dict(devices), st.st_mtime

    def _fresh(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._checked >= RELOAD_EVERY:
            self._checked = now
            self._load()
        return self._devices

    def cohort_of(self, device: str) -> str | None:
        return self._fresh().get(device)

    def members(self, cohort: str) -> list[str]:
        return sorted(d for d, c in self._fresh().items() if c == cohort)

    def cohorts(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for d, c in sorted(self._fresh().items()):
            out.setdefault(c, []).append(d)
        return out


def capped_shares(counts: list[int], cap: float) -> np.ndarray:
    """Each member's share of the cohort's loss: proportional to its samples, none above ``cap``
    (what a capped member loses goes to the others in proportion, water-filling). ``cap`` at or
    below 1/M gives every member an equal share."""
    n = np.asarray(counts, dtype=np.float64)
    m = len(n)
    if m == 0 or n.sum() <= 0:
        return np.zeros(m)
    cap = max(cap, 1.0 / m)
    share = n / n.sum()
    fixed = np.zeros(m, dtype=bool)
    while True:
        over = (share > cap + 1e-12) & ~fixed
        if not over.any():
            return share
        fixed |= over
        share[fixed] = cap
        rest = ~fixed
        left = 1.0 - cap * fixed.sum()
        share[rest] = n[rest] / n[rest].sum() * left if n[rest].sum() > 0 else 0.0


def member_weights(counts: list[int], cap: float) -> np.ndarray:
    """Per-sample loss weights (mean 1) that give each member its capped share."""
    share = capped_shares(counts, cap)
    total = float(sum(counts))
    return np.concatenate([np.full(c, s * total / c, dtype=np.float32) for c, s in zip(counts, share) if c])


def tag(cohort: str) -> str:
    return f"{{cohort/{cohort}}}"


def ckey(kind: str, cohort: str, suffix: str | int | None = None) -> str:
    return f"st:{kind}:{tag(cohort)}" + ("" if suffix is None else f":{suffix}")


# Bind a cohort to the task of its first job, or say what it is bound to.
_BIND = """
-- KEYS: cohort; ARGV: fingerprint, spec
local f = redis.call('hget', KEYS[1], 'fingerprint')
if not f then
  redis.call('hset', KEYS[1], 'fingerprint', ARGV[1], 'spec', ARGV[2])
  return {ARGV[1], ARGV[2]}
end
return {f, redis.call('hget', KEYS[1], 'spec')}
"""
# The next adapter version of a cohort, above every member's own (so each board installs it).
_NEXT_VERSION = """#!lua flags=allow-oom
-- KEYS: version counter; ARGV: floor
local v = redis.call('incr', KEYS[1])
local floor = tonumber(ARGV[1])
if v <= floor then
  v = floor + 1
  redis.call('set', KEYS[1], v)
end
return v
"""


@dataclass(frozen=True)
class PoolEntry:
    device: str
    job_id: str
    keys: list[str]  # hex, in the order of the targets
    targets: np.ndarray  # (n, K) float32


class CohortStore:
    """A cohort's task binding, pool and adapters in Redis."""

    def __init__(self, r: redis.Redis, adapters_kept: int = 3) -> None:
        self.r = r
        self.adapters_kept = adapters_kept
        self._bind = r.register_script(_BIND)
        self._next = r.register_script(_NEXT_VERSION)

    def bind(self, cohort: str, fingerprint: str, spec: SideNetSpec) -> str | None:
        """None if a job of this fingerprint and spec fits the cohort's task (binding a new
        cohort to it), else why not."""
        f, s = cast(list[bytes], self._bind(keys=[ckey("cohort", cohort)],
                                            args=[fingerprint, spec.model_dump_json()]))
        if f.decode() != fingerprint:
            return (f"cohort {cohort} trains on backbone {f.decode()[:12]}…, this job's is "
                    f"{fingerprint[:12]}…")
        if SideNetSpec.model_validate_json(s) != spec:
            return f"cohort {cohort} trains the side network {s.decode()}, this job asks for {spec.model_dump_json()}"
        return None

    def put(self, cohort: str, device: str, job_id: str, keys: list[str], targets: np.ndarray) -> None:
        """Make this job the member's entry in the pool (replacing its older one)."""
        blob = b"".join(bytes.fromhex(k) for k in keys)
        pipe = self.r.pipeline(transaction=True)  # both keys in the cohort's slot
        pipe.hset(ckey("pooled", cohort, device), mapping={
            "job": job_id, "n": len(keys), "keys": blob,
            "targets": np.ascontiguousarray(targets, dtype="<f4").tobytes()})
        pipe.hset(ckey("pool", cohort), device, job_id)
        pipe.execute()

    def pool_jobs(self, cohort: str) -> dict[str, str]:
        """member -> its job in the pool."""
        h = cast(dict[bytes, bytes], self.r.hgetall(ckey("pool", cohort)))
        return {k.decode(): v.decode() for k, v in h.items()}

    def entries(self, cohort: str, members: list[str], out_dim: int) -> list[PoolEntry]:
        """The pool's entries of these members (others are left out: no longer members)."""
        out = []
        for dev in members:
            h = cast(dict[bytes, bytes], self.r.hgetall(ckey("pooled", cohort, dev)))
            if not h or b"keys" not in h:
                continue
            n = int(h[b"n"])
            raw, tg = h[b"keys"], h[b"targets"]
            if len(raw) != 32 * n or len(tg) != 4 * n * out_dim:
                log.warning("cohort %s: the pool entry of %s is damaged; left out", cohort, dev)
                continue
            keys = [raw[i : i + 32].hex() for i in range(0, len(raw), 32)]
            out.append(PoolEntry(dev, h[b"job"].decode(), keys,
                                 np.frombuffer(tg, "<f4").reshape(n, out_dim).astype(np.float32)))
        return out

    def drop(self, cohort: str, device: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(ckey("pooled", cohort, device))
        pipe.hdel(ckey("pool", cohort), device)
        pipe.execute()

    def version(self, cohort: str) -> int:
        return int(cast(bytes | None, self.r.get(ckey("cadapter_ver", cohort))) or 0)

    def next_version(self, cohort: str, floor: int) -> int:
        return int(self._next(keys=[ckey("cadapter_ver", cohort)], args=[floor]))

    def save_adapter(self, cohort: str, version: int, weights: bytes, meta: dict[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(ckey("cadapter", cohort, version), mapping={"weights": weights, "meta": json.dumps(meta)})
        pipe.delete(ckey("cadapter", cohort, version - self.adapters_kept))
        pipe.execute()

    def adapter(self, cohort: str, version: int) -> tuple[bytes, dict[str, Any]] | None:
        h = cast(dict[bytes, bytes], self.r.hgetall(ckey("cadapter", cohort, version)))
        if not h or b"weights" not in h:
            return None
        return bytes(h[b"weights"]), json.loads(h.get(b"meta", b"{}"))

    def current_for(self, cohort: str, device: str, has: int, job_id: str | None = None) -> AdapterUpdate | None:
        """The cohort's current adapter addressed to ``device``, if it is newer than the device's
        version ``has`` (None otherwise). ``job_id``: the one it carries (default: the run's)."""
        v = self.version(cohort)
        got = self.adapter(cohort, v) if v > has else None
        task = self.task(cohort)
        if got is None or task is None:
            return None
        weights, meta = got
        return AdapterUpdate(device_id=device, job_id=job_id or meta.get("job_id", f"cohort-v{v}"), version=v,
                             base_version=has, backbone_fingerprint=task[0], spec=task[1], weights=weights,
                             metrics=meta.get("metrics", {}))

    def task(self, cohort: str) -> tuple[str, SideNetSpec] | None:
        h = cast(dict[bytes, bytes], self.r.hgetall(ckey("cohort", cohort)))
        if b"fingerprint" not in h:
            return None
        return h[b"fingerprint"].decode(), SideNetSpec.model_validate_json(h[b"spec"])


def cohort_snapshot(r: redis.Redis, registry: CohortRegistry) -> list[dict[str, Any]]:
    """Every cohort of the registry: its members, task, adapter version and last metrics, the
    samples each member has in the pool and the federated updates waiting (what `sidetune fleet
    cohorts` shows)."""
    store = CohortStore(r)
    out = []
    for name, members in registry.cohorts().items():
        task = store.task(name)
        v = store.version(name)
        got = store.adapter(name, v) if v else None
        pooled = {}
        for dev in members:
            n = cast(bytes | None, r.hget(ckey("pooled", name, dev), "n"))
            pooled[dev] = int(n) if n is not None else 0
        pending = cast(dict[bytes, bytes], r.hgetall(ckey("fedpend", name)))
        out.append({"cohort": name, "members": members, "fingerprint": task[0] if task else None,
                    "spec": task[1].model_dump() if task else None, "adapter_version": v,
                    "metrics": got[1].get("metrics", {}) if got else {}, "samples_pooled": pooled,
                    "updates_waiting": sorted(k.decode() for k in pending)})
    return out
