"""Side-network weights as safetensors: names and shapes derived from the spec.

Both sides name parameters the same way (``expected_shapes``), so the torch
module's ``state_dict`` and the board's numpy forward pass read one file.
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from schemas.errors import SidetuneError
from schemas.spec import SideNetSpec


class WeightsError(SidetuneError, ValueError):
    """Weights that are not a valid safetensors file for the spec."""


def expected_shapes(spec: SideNetSpec) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape for ``spec`` (d = width, r = bottleneck, K = out_dim)."""
    d, r, k = spec.width, spec.bottleneck, spec.out_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for j in range(len(spec.taps)):
        if j > 0:
            shapes[f"ladder.{j}.alpha"] = (1,)  # gate μ_j = sigmoid(α_j); the first tap has no predecessor
        shapes[f"ladder.{j}.down.weight"] = (r, d)
        shapes[f"ladder.{j}.down.bias"] = (r,)
        shapes[f"ladder.{j}.up.weight"] = (d, r)
        shapes[f"ladder.{j}.up.bias"] = (d,)
    shapes["out.weight"] = (k, d)
    shapes["out.bias"] = (k,)
    return shapes


def encode_weights(tensors: dict[str, np.ndarray], spec: SideNetSpec) -> bytes:
    """Serialise float32 weights after checking them against the spec."""
    clean = {name: np.ascontiguousarray(np.asarray(t, dtype=np.float32)) for name, t in tensors.items()}
    _check(clean, spec)
    return bytes(_st_save(clean, metadata={"format": "sidetune-sidenet-v1"}))


def decode_weights(blob: bytes, spec: SideNetSpec) -> dict[str, np.ndarray]:
    """Parse and check safetensors bytes; raises :class:`WeightsError`."""
    if len(blob) < 8:
        raise WeightsError("weights are not a safetensors file (too short)")
    try:
        tensors = _st_load(bytes(blob))
    except Exception as e:  # the parser raises its own types on bad bytes
        raise WeightsError(f"weights are not a valid safetensors file: {e}") from None
    _check(tensors, spec)
    return {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}


def check_weights(blob: bytes, spec: SideNetSpec) -> None:
    decode_weights(blob, spec)


def _check(tensors: dict[str, np.ndarray], spec: SideNetSpec) -> None:
    want = expected_shapes(spec)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise WeightsError(f"weights do not match the spec: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in want.items():
        t = tensors[name]
        if t.dtype != np.float32:
            raise WeightsError(f"weight {name} is {t.dtype}, expected float32")
        if tuple(t.shape) != shape:
            raise WeightsError(f"weight {name} has shape {list(t.shape)}, expected {list(shape)}")
        if not np.all(np.isfinite(t)):
            raise WeightsError(f"weight {name} holds NaN or infinite values")
