"""The activation cache in Redis: one entry per (device, sample key).

Value layout: ``u8 dtype | u16 states | u16 width | data | scales`` — the
sample's slice of the wire tensor, stored as received (fp16 or int8), so the
cache costs what the wire costs. Keys carry a TTL (``volatile-lru`` may evict
them sooner); a gone key is simply reported missing and the board asked again.

Entries are ``st:act:{dev}:key``, the device id in braces (a Redis Cluster hash tag, as for
every key of the device in side_server/store.py): a device's entries and their bookkeeping
share one slot, so each script and pipeline here runs on one node.

Each device's cached bytes are counted against its quota in the same Lua script
that writes them (all of a batch or none of it): ``st:usage:{dev}`` field
``cache_bytes``, with an index of what is charged — ``st:csize:{dev}`` (raw key →
bytes charged) and ``st:cexp:{dev}`` (raw key → expiry, ms). Entries whose TTL
has lapsed are given back at the next write; entries Redis evicted early are
found (and given back) by :meth:`ActivationCache.reconcile`, run when a device
seems to be over its quota and Redis has evicted something since its last run.
"""

from __future__ import annotations

import struct
from typing import Any, cast

import numpy as np
import redis

from schemas.tensors import DType, WireTensor
from side_server.quotas import CACHE_ENTRY_OVERHEAD
from side_server.store import key

_HEAD = struct.Struct("<BHH")
_CODES = {"float32": 0, "float16": 1, "int8": 2}
_NAMES: dict[int, DType] = {0: "float32", 1: "float16", 2: "int8"}
_ITEM = {"float32": 4, "float16": 2, "int8": 1}


def act_key(device: str, sample: str) -> str:
    return key("act", device, sample)


_PRUNE = """
local _t = redis.call('time')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
local gone = redis.call('zrangebyscore', KEYS[3], '-inf', now, 'LIMIT', 0, 512)
local freed = 0
for _, k in ipairs(gone) do
  freed = freed + tonumber(redis.call('hget', KEYS[2], k) or '0')
  redis.call('hdel', KEYS[2], k)
  redis.call('zrem', KEYS[3], k)
end
if freed > 0 then redis.call('hincrby', KEYS[1], 'cache_bytes', -freed) end
"""
# Store a batch within the device's cache quota: every entry or none.
_PUT = "#!lua\n" + _PRUNE + """
-- KEYS: usage, csize, cexp, entry keys...; ARGV: ttl ms, quota, overhead, raw keys..., values...
local n = #KEYS - 3
local overhead = tonumber(ARGV[3])
local delta = 0
for i = 1, n do
  delta = delta + #ARGV[3 + n + i] + overhead - tonumber(redis.call('hget', KEYS[2], ARGV[3 + i]) or '0')
end
local used = tonumber(redis.call('hget', KEYS[1], 'cache_bytes') or '0')
if delta > 0 and used + delta > tonumber(ARGV[2]) then return {0, used} end
local ttl = tonumber(ARGV[1])
for i = 1, n do
  redis.call('set', KEYS[3 + i], ARGV[3 + n + i], 'PX', ttl)
  redis.call('hset', KEYS[2], ARGV[3 + i], #ARGV[3 + n + i] + overhead)
  redis.call('zadd', KEYS[3], now + ttl, ARGV[3 + i])
end
redis.call('hincrby', KEYS[1], 'cache_bytes', delta)
return {1, used + delta}
"""
_PRUNE_ONLY = "#!lua flags=allow-oom\n" + _PRUNE + "return #gone"
# Give back what Redis evicted before its TTL: KEYS usage, csize, cexp, entry keys...; ARGV raw keys...
_RECONCILE = """#!lua flags=allow-oom
local freed = 0
for i = 4, #KEYS do
  if redis.call('exists', KEYS[i]) == 0 then
    freed = freed + tonumber(redis.call('hget', KEYS[2], ARGV[i - 3]) or '0')
    redis.call('hdel', KEYS[2], ARGV[i - 3])
    redis.call('zrem', KEYS[3], ARGV[i - 3])
  end
end
if freed > 0 then redis.call('hincrby', KEYS[1], 'cache_bytes', -freed) end
return freed
"""


class CacheFull(Exception):
    """The batch would take the device past its cache quota (nothing was stored)."""

    def __init__(self, used: int, batch: int) -> None:
        super().__init__(f"{used} bytes cached, the batch needs {batch} more")
        self.used = used
        self.batch = batch


class ActivationCache:
    def __init__(self, r: redis.Redis, ttl: int, quota: int = 2**62) -> None:
        self.r = r
        self.ttl = ttl
        self.quota = quota
        self._put = r.register_script(_PUT)
        self._prune = r.register_script(_PRUNE_ONLY)
        self._reconcile = r.register_script(_RECONCILE)
        self._evicted_seen: dict[str, int] = {}

    @staticmethod
    def _index(device: str) -> list[str]:
        return [key("usage", device), key("csize", device), key("cexp", device)]

    def put_batch(self, device: str, keys: tuple[str, ...], states: WireTensor) -> int:
        """Cache a batch; the device's cached bytes after it. Raises :class:`CacheFull` (nothing
        stored) past the quota, ``redis.OutOfMemoryError`` when Redis is full."""
        n, s, d = states.shape
        item = _ITEM[states.dtype]
        row = s * d * item
        blobs = []
        for i in range(len(keys)):
            blob = _HEAD.pack(_CODES[states.dtype], s, d) + states.data[i * row : (i + 1) * row]
            if states.scale is not None:
                blob += states.scale[i * s * 4 : (i + 1) * s * 4]
            blobs.append(blob)
        run_keys = self._index(device) + [act_key(device, k) for k in keys]
        args: list[Any] = [self.ttl * 1000, self.quota, CACHE_ENTRY_OVERHEAD, *(bytes.fromhex(k) for k in keys), *blobs]
        for again in (False, True):
            ok, used = cast(list[int], self._put(keys=run_keys, args=args))
            if ok:
                return int(used)
            if again or not self.reconcile(device):
                break
        raise CacheFull(int(used), sum(len(b) for b in blobs) + CACHE_ENTRY_OVERHEAD * len(blobs))

    def reconcile(self, device: str, force: bool = False) -> int:
        """Give back the device's lapsed entries, and, if Redis evicted anything since this last ran
        for the device (or ``force``), its evicted ones: bytes given back."""
        before = self.used(device)
        while int(self._prune(keys=self._index(device))) == 512:
            pass
        evicted = evicted_keys(self.r)
        if force or self._evicted_seen.get(device) != evicted:
            self._evicted_seen[device] = evicted
            for chunk in _chunks(self.r.hscan_iter(key("csize", device), count=500), 500):
                raw = [k for k, _ in chunk]
                self._reconcile(keys=self._index(device) + [act_key(device, k.hex()) for k in raw], args=raw)
        return max(0, before - self.used(device))

    def used(self, device: str) -> int:
        return int(cast(bytes | int | None, self.r.hget(key("usage", device), "cache_bytes")) or 0)

    def samples(self, device: str) -> int:
        """Entries charged to the device: its cached samples (until the next prune or reconcile)."""
        return int(cast(int, self.r.hlen(self._index(device)[1])))

    def missing(self, device: str, keys: tuple[str, ...] | list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            pipe = self.r.pipeline(transaction=False)  # one slot (the device's): one node, one round trip
            for k in chunk:
                pipe.exists(act_key(device, k))
            out += [k for k, there in zip(chunk, pipe.execute()) if not there]
        return out

    def get_many(
        self, device: str, keys: tuple[str, ...] | list[str], taps: tuple[int, ...]
    ) -> tuple[np.ndarray | None, list[str]]:
        """The tapped states ``(N, T, d)`` float32 of ``keys``, or the keys that are gone."""
        rows: list[np.ndarray] = []
        gone: list[str] = []
        idx = list(taps)
        for start in range(0, len(keys), 256):
            chunk = list(keys[start : start + 256])
            for k, blob in zip(chunk, self.r.mget([act_key(device, k) for k in chunk])):
                row = _decode_row(cast(bytes, blob)) if blob is not None else None
                if row is None or row.shape[0] <= max(idx):
                    gone.append(k)  # expired, evicted or unreadable: ask the board again
                    continue
                rows.append(row[idx])
        if gone:
            return None, gone
        return np.stack(rows), []


def evicted_keys(r: Any) -> int:
    """Keys Redis evicted since it started (summed over the primaries of a cluster)."""
    info = cast(dict[str, Any], r.info("stats"))
    if "evicted_keys" in info:
        return int(info["evicted_keys"])
    return sum(int(v.get("evicted_keys", 0)) for v in info.values() if isinstance(v, dict))


def _chunks(it: Any, size: int) -> Any:
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decode_row(blob: bytes) -> np.ndarray | None:
    """One cached sample's states ``(L+1, d)``, or None if the entry is damaged."""
    if len(blob) < _HEAD.size:
        return None
    code, s, d = _HEAD.unpack_from(blob)
    dtype = _NAMES.get(code)
    if dtype is None:
        return None
    n = s * d * _ITEM[dtype]
    data = blob[_HEAD.size : _HEAD.size + n]
    scale = blob[_HEAD.size + n :] if dtype == "int8" else None
    try:  # validated like anything from the wire: lengths, finite values, scales
        return WireTensor(dtype=dtype, shape=(s, d), data=data, scale=scale).to_array()
    except ValueError:
        return None
