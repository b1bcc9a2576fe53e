"""The additive ladder side network (DESIGN.md §2.4), in torch, built from a spec.

For each tapped layer j (taps from the device's spec)::

    s_j = (1 − μ_j)·norm(A_tap_j) + μ_j·h_{j−1}      μ_j = sigmoid(α_j); s_0 = norm(A_tap_0)
    h_j = s_j + W_up_j · act(W_down_j · s_j)          bottleneck r
    g(A) = W_out · LayerNorm(h_last)                  ∈ R^K

``W_up`` and ``W_out`` start at zero: a fresh network outputs 0, so the board's
prediction starts as the backbone's own. Parameter names follow
``schemas.weights.expected_shapes`` so ``state_dict`` *is* the adapter file.
The board's numpy twin is ``schemas/sidenet.py`` (parity-tested: forward, gradients, training).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from schemas.spec import SideNetSpec
from schemas.weights import decode_weights, encode_weights

LN_EPS = 1e-5


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    return torch.tanh(x)


class LadderBlock(nn.Module):
    def __init__(self, d: int, r: int, gated: bool) -> None:
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.alpha = nn.Parameter(torch.zeros(1)) if gated else None  # μ = 0.5 at start


class SideNet(nn.Module):
    def __init__(self, spec: SideNetSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.width
        self.ladder = nn.ModuleList(LadderBlock(d, spec.bottleneck, gated=j > 0) for j in range(len(spec.taps)))
        self.out = nn.Linear(d, spec.out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.taps: torch.Tensor
        self.register_buffer("taps", torch.tensor(spec.taps, dtype=torch.long), persistent=False)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """states (B, L+1, d) float32 → g(A) (B, K)."""
        return self.forward_tapped(states.index_select(1, self.taps))

    def forward_tapped(self, a: torch.Tensor) -> torch.Tensor:
        """a (B, T, d): the tapped states only (the trainer keeps just these in memory)."""
        if self.spec.norm == "layernorm":
            a = F.layer_norm(a, a.shape[-1:], eps=LN_EPS)
        h = a[:, 0]
        for j, block in enumerate(self.blocks()):
            if j == 0 or block.alpha is None:
                s = h
            else:
                mu = torch.sigmoid(block.alpha)
                s = (1 - mu) * a[:, j] + mu * h
            h = s + block.up(_act(self.spec.activation, block.down(s)))  # (B, d)
        return self.out(F.layer_norm(h, h.shape[-1:], eps=LN_EPS))  # (B, K)

    def blocks(self) -> list[LadderBlock]:
        return cast(list[LadderBlock], list(self.ladder))

    def gates(self) -> list[float]:
        """μ_j of the gated taps (the prototype saw them stay near 0.5)."""
        return [float(torch.sigmoid(b.alpha).item()) for b in self.blocks() if b.alpha is not None]

    # ------------------------------------------------------------ adapter bytes

    def to_weights(self) -> bytes:
        return encode_weights({k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}, self.spec)

    def load_weights(self, blob: bytes) -> None:
        tensors = decode_weights(blob, self.spec)
        self.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
