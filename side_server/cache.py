"""The activation cache in Redis: one entry per (device, sample key).

Value layout: ``u8 dtype | u16 states | u16 width | data | scales`` — the
sample's slice of the wire tensor, stored as received (fp16 or int8), so the
cache costs what the wire costs. Keys carry a TTL (``volatile-lru`` may evict
them sooner); a gone key is simply reported missing and the board asked again.
"""

from __future__ import annotations

import struct
from typing import cast

import numpy as np
import redis

from schemas.tensors import DType, WireTensor

_HEAD = struct.Struct("<BHH")
_CODES = {"float32": 0, "float16": 1, "int8": 2}
_NAMES: dict[int, DType] = {0: "float32", 1: "float16", 2: "int8"}
_ITEM = {"float32": 4, "float16": 2, "int8": 1}


def act_key(device: str, key: str) -> str:
    return f"st:act:{device}:{key}"


class ActivationCache:
    def __init__(self, r: redis.Redis, ttl: int) -> None:
        self.r = r
        self.ttl = ttl

    def put_batch(self, device: str, keys: tuple[str, ...], states: WireTensor) -> None:
        n, s, d = states.shape
        item = _ITEM[states.dtype]
        row = s * d * item
        pipe = self.r.pipeline(transaction=False)
        for i, key in enumerate(keys):
            blob = _HEAD.pack(_CODES[states.dtype], s, d) + states.data[i * row : (i + 1) * row]
            if states.scale is not None:
                blob += states.scale[i * s * 4 : (i + 1) * s * 4]
            pipe.set(act_key(device, key), blob, ex=self.ttl)
        pipe.execute()

    def missing(self, device: str, keys: tuple[str, ...] | list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            pipe = self.r.pipeline(transaction=False)
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
