"""Tensors on the wire: raw little-endian bytes with explicit dtype and shape.

Three encodings:

* ``float32`` and ``float16``: the values themselves;
* ``int8``: ``round(x / s)`` with one float32 scale ``s = max|x| / 127`` per
  vector along the last axis (a per-(sample, layer) scale for activations),
  so one outlier layer does not flatten all the others.

Never pickle: a :class:`WireTensor` is bytes plus a description, checked on
construction (lengths, finiteness, bounds); :func:`WireTensor.to_array` gives
float32 back.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from schemas.limits import MAX_TENSOR_ELEMENTS, MAX_TENSOR_NDIM

DType = Literal["float32", "float16", "int8"]
_NP: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}
#: The unsigned view and exponent mask of each float dtype.
_EXPONENT: dict[str, tuple[str, int]] = {"float32": ("<u4", 0x7F800000), "float16": ("<u2", 0x7C00)}
#: Largest int8 scale: 127 · scale stays a finite float32 (with room for rounding).
MAX_SCALE = float(np.finfo(np.float32).max) / 128.0
#: Smallest: a scale that is a float32 subnormal loses the values it should carry.
MIN_SCALE = float(np.finfo(np.float32).tiny)


class WireTensor(BaseModel):
    """A tensor as it travels: raw bytes, dtype, shape (and int8 scales)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    dtype: DType
    shape: tuple[int, ...]
    data: bytes
    #: float32 scales, one per vector along the last axis; int8 only.
    scale: bytes | None = None

    @field_validator("shape")
    @classmethod
    def _shape_ok(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not 1 <= len(shape) <= MAX_TENSOR_NDIM:
            raise ValueError(f"a tensor has 1 to {MAX_TENSOR_NDIM} dimensions, not {len(shape)}")
        if any(n < 0 for n in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        if math.prod(shape) > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"tensor of shape {shape} exceeds {MAX_TENSOR_ELEMENTS} elements")
        return shape

    @model_validator(mode="after")
    def _bytes_ok(self) -> WireTensor:
        n = math.prod(self.shape)
        want = n * _NP[self.dtype].itemsize
        if len(self.data) != want:
            raise ValueError(
                f"{self.dtype} tensor of shape {list(self.shape)} needs {want} bytes, got {len(self.data)}"
            )
        if self.dtype == "int8":
            if self.scale is None:
                raise ValueError("an int8 tensor needs its per-vector scales")
            vectors = math.prod(self.shape[:-1])
            if len(self.scale) != 4 * vectors:
                raise ValueError(f"int8 tensor of shape {list(self.shape)} needs {vectors} scales, got {len(self.scale) / 4:g}")
            s = np.frombuffer(self.scale, dtype="<f4")
            if not (np.all(np.isfinite(s)) and np.all(s >= MIN_SCALE) and np.all(s <= MAX_SCALE)):
                raise ValueError(f"int8 scales must be finite and positive, within [{MIN_SCALE:.3g}, {MAX_SCALE:.3g}]")
        else:
            if self.scale is not None:
                raise ValueError(f"a {self.dtype} tensor carries no scales")
            # NaN or ±inf: every exponent bit set (checked on the bits: 10-30x faster than
            # np.isfinite on float16, which the server runs on every activation batch)
            bits, exponent = _EXPONENT[self.dtype]
            raw = np.frombuffer(self.data, dtype=bits)
            if raw.size and int(np.max(raw & exponent)) == exponent:
                raise ValueError("tensor holds NaN or infinite values")
        return self

    @classmethod
    def from_array(cls, x: np.ndarray, dtype: DType = "float32") -> WireTensor:
        """Encode a float array; raises ``ValueError`` on NaN/inf or out-of-range values."""
        with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
            x = np.asarray(x, dtype=np.float32)
            if not np.all(np.isfinite(x)):
                raise ValueError("cannot encode NaN or infinite values (or values beyond float32)")
            if dtype == "int8":
                if x.ndim == 0:
                    raise ValueError("an int8 tensor needs at least one dimension")
                if x.shape[-1]:
                    amax = np.max(np.abs(x).astype(np.float64), axis=-1, keepdims=True)
                else:
                    amax = np.zeros(x.shape[:-1] + (1,))
                scale = np.clip(amax / 127.0, MIN_SCALE, MAX_SCALE)  # float64: no overflow, no zero
                q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
                return cls(dtype="int8", shape=tuple(x.shape), data=q.tobytes(), scale=scale.astype("<f4").tobytes())
            y = x.astype(_NP[dtype])
        if not np.all(np.isfinite(y)):
            raise ValueError(f"values exceed the {dtype} range")
        return cls(dtype=dtype, shape=tuple(x.shape), data=y.tobytes())

    def to_array(self) -> np.ndarray:
        """The values as float32 (a fresh, writable array)."""
        raw = np.frombuffer(self.data, dtype=_NP[self.dtype]).reshape(self.shape)
        if self.dtype == "int8":
            assert self.scale is not None
            s = np.frombuffer(self.scale, dtype="<f4").reshape(self.shape[:-1] + (1,))
            return (raw.astype(np.float32) * s).astype(np.float32)
        return raw.astype(np.float32)

    @property
    def nbytes(self) -> int:
        return len(self.data) + (len(self.scale) if self.scale else 0)

    def __repr__(self) -> str:
        return f"WireTensor(dtype={self.dtype!r}, shape={list(self.shape)})"
