"""Per-device quotas (DESIGN.md §8): what a job costs, checked before anything is stored or allocated.

Each quota of :class:`side_server.config.Quotas` has its own rejection code in the shared
contract (``schemas.status.RejectCode``), and the reason starts with the code and the
quota's setting name, e.g. ``quota_jobs (quotas.jobs_in_flight = 16): ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.errors import SidetuneError
from schemas.spec import HyperParams, SideNetSpec
from side_server.config import Quotas

#: quota code -> the setting (of ServerSettings) that bounds it
QUOTA_SETTINGS = {
    "quota_jobs": "quotas.jobs_in_flight",
    "quota_samples": "quotas.samples_per_job",
    "quota_cache": "quotas.cache_bytes",
    "quota_records": "quotas.record_bytes",
    "quota_sidenet": "quotas.sidenet_params",
    "quota_memory": "quotas.train_memory_bytes",
    "quota_work": "quotas.epoch_samples",
    "quota_rate": "quotas.messages_per_second",
}
#: Redis refused a write: it is at its maxmemory with nothing it may evict.
SERVER_FULL = "server_full"

#: Bytes the cache charges per entry on top of its value: the Redis key, its expiry, and the
#: entry in the device's cache index (a hash field and a sorted-set member).
CACHE_ENTRY_OVERHEAD = 256
#: Bytes a job record charges per sample: its key in the job's key hash (32 raw bytes + ~100 of
#: Redis bookkeeping) and in its need set (64 hex bytes + ~80).
RECORD_BYTES_PER_SAMPLE = 32 + 100 + 64 + 80
#: Bytes of a job record besides its samples (the metadata hash, set members, queue entries).
RECORD_BASE_BYTES = 4096


class Rejected(SidetuneError):
    """A message the server refuses: answered on the device's ``errors`` topic with ``code``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class OverQuota(Rejected):
    def __init__(self, code: str, limit: object, reason: str) -> None:
        super().__init__(code, f"{code} ({QUOTA_SETTINGS[code]} = {limit}): {reason}")


# --------------------------------------------------------------------------- what a job costs


def sidenet_params(spec: SideNetSpec) -> int:
    """Parameters of the ladder side network (side_server/sidenet.py), from the spec alone."""
    d, r, k = spec.width, spec.bottleneck, spec.out_dim
    per_block = (d * r + r) + (r * d + d)  # down, up
    gates = len(spec.taps) - 1  # one α per tap after the first
    return len(spec.taps) * per_block + gates + d * k + k


def train_memory(spec: SideNetSpec, hyper: HyperParams, samples: int) -> int:
    """Bytes a worker's training of this job implies, from the spec alone (float32 throughout).

    * parameters ×20: weights, gradients, AdamW's two moments, the best epoch's copy, and a
      checkpoint's clones and serialised bytes (transient, ×12);
    * the job's tapped states ``(N, T, d)`` twice (the rows read from the cache, then stacked),
      and its targets ``(N, K)`` twice;
    * one batch's forward and backward activations: per tapped layer ~12 vectors of width d
      and 4 of width r per sample, plus the normalised input.
    """
    t, d, r, k = len(spec.taps), spec.width, spec.bottleneck, spec.out_dim
    b = min(hyper.batch_size, samples)
    params = 20 * 4 * sidenet_params(spec)
    data = 2 * 4 * samples * t * d + 2 * 4 * samples * k
    batch = 4 * b * t * (14 * d + 4 * r)
    return params + data + batch


def cache_bytes_per_sample(spec: SideNetSpec) -> int:
    """The least a cached sample costs (int8 states and their scales, the entry's overhead)."""
    return 5 + spec.num_states * spec.width + 4 * spec.num_states + CACHE_ENTRY_OVERHEAD


def checkpoint_bytes_estimate(spec: SideNetSpec) -> int:
    """A checkpoint: weights, AdamW's two moments and the best weights, float32."""
    return 4 * 4 * sidenet_params(spec) + 4096


def record_bytes(spec: SideNetSpec, samples: int) -> int:
    """What a job's records take in Redis while it is in flight (charged to its device)."""
    return (RECORD_BASE_BYTES + samples * RECORD_BYTES_PER_SAMPLE + 4 * samples * spec.out_dim
            + checkpoint_bytes_estimate(spec))


@dataclass(frozen=True)
class JobCost:
    params: int
    memory: int
    records: int
    cache: int


def check_job(q: Quotas, spec: SideNetSpec, hyper: HyperParams, samples: int) -> JobCost:
    """Every quota a job can be judged by without Redis; raises :class:`OverQuota`."""
    if samples > q.samples_per_job:
        raise OverQuota("quota_samples", q.samples_per_job, f"the job has {samples} samples")
    work = samples * hyper.epochs
    if work > q.epoch_samples:
        raise OverQuota("quota_work", q.epoch_samples,
                        f"the job asks for {hyper.epochs} epochs × {samples} samples = {work}")
    cost = JobCost(sidenet_params(spec), train_memory(spec, hyper, samples), record_bytes(spec, samples),
                   samples * cache_bytes_per_sample(spec))
    if cost.params > q.sidenet_params:
        raise OverQuota("quota_sidenet", q.sidenet_params, f"the side network would have {cost.params} parameters")
    if cost.memory > q.train_memory_bytes:
        raise OverQuota("quota_memory", q.train_memory_bytes,
                        f"training it would take about {cost.memory} bytes of memory")
    if cost.records > q.record_bytes:
        raise OverQuota("quota_records", q.record_bytes, f"the job's records would take {cost.records} bytes")
    if cost.cache > q.cache_bytes:
        raise OverQuota("quota_cache", q.cache_bytes,
                        f"the job's activations need at least {cost.cache} bytes of cache")
    return cost
