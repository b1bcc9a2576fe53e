"""The side network's forward pass on the board, in numpy (no torch on a board).

Twin of ``side_server/sidenet.py``; same spec, same weight names, same maths
(tanh-approximated GELU, LayerNorm without affine, eps 1e-5).
"""

from __future__ import annotations

import numpy as np

from schemas.spec import SideNetSpec
from schemas.weights import decode_weights

LN_EPS = 1e-5


def _layer_norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS)


def _act(name: str, x: np.ndarray) -> np.ndarray:
    if name == "gelu":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    return np.tanh(x)


class SideNetForward:
    def __init__(self, spec: SideNetSpec, weights: dict[str, np.ndarray]) -> None:
        self.spec = spec
        self.w = weights

    @classmethod
    def from_bytes(cls, spec: SideNetSpec, blob: bytes) -> SideNetForward:
        return cls(spec, decode_weights(blob, spec))

    def __call__(self, states: np.ndarray) -> np.ndarray:
        """states (B, L+1, d) → g(A) (B, K), float32."""
        w, spec = self.w, self.spec
        a = states[:, list(spec.taps)].astype(np.float32)  # (B, T, d)
        if spec.norm == "layernorm":
            a = _layer_norm(a)
        h = a[:, 0]
        for j in range(len(spec.taps)):
            if j == 0:
                s = h
            else:
                mu = 1.0 / (1.0 + np.exp(-w[f"ladder.{j}.alpha"][0]))
                s = (1 - mu) * a[:, j] + mu * h
            z = s @ w[f"ladder.{j}.down.weight"].T + w[f"ladder.{j}.down.bias"]  # (B, r)
            h = s + _act(spec.activation, z) @ w[f"ladder.{j}.up.weight"].T + w[f"ladder.{j}.up.bias"]  # (B, d)
        return (_layer_norm(h) @ w["out.weight"].T + w["out.bias"]).astype(np.float32)  # (B, K)
