"""The additive ladder side network in numpy: its one forward pass, its gradients, and its training.

For each tapped layer j (taps from the device's spec)::

    s_0 = norm(A_tap_0)
    s_j = (1 − μ_j)·norm(A_tap_j) + μ_j·h_{j−1}      μ_j = sigmoid(α_j)
    h_j = s_j + W_up_j · act(W_down_j · s_j)          bottleneck r
    g(A) = W_out · LayerNorm(h_last)                  ∈ R^K

``norm`` is a LayerNorm without affine (raw hidden states have huge outliers); ``act``
is GELU (tanh approximation), ReLU or tanh. ``W_up`` and ``W_out`` start at zero, so a
fresh network outputs 0 and the board's prediction starts as the backbone's own.

The board runs this module (predictions, and ``train_on = "board"`` / a federated
cohort's local training); the server trains the same network in torch
(``side_server/sidenet.py``), with the same parameter names
(``schemas.weights.expected_shapes``), the same loss ``mean_i w_i·‖g(A_i) − target_i‖²``
(``w_i`` = 1 unless a cohort caps a member's share), the same AdamW, split, batch
order and best-epoch choice (``schemas.schedule``). ``tests/test_board_gradients.py``
checks the gradients and a whole training run against torch's.

Only the initialisation differs: a fresh network draws ``down`` from numpy's generator
(the same U(±1/√d) as torch's ``nn.Linear``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from schemas.schedule import EpochReport, epoch_order, split
from schemas.spec import HyperParams, SideNetSpec
from schemas.weights import decode_weights, encode_weights, expected_shapes

LN_EPS = 1e-5
_K = np.sqrt(2.0 / np.pi)
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

Weights = dict[str, np.ndarray]


def _ln(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LayerNorm without affine over the last axis: (normalised, 1/σ)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    inv = 1.0 / np.sqrt(var + LN_EPS)
    return (x - mean) * inv, inv


def _ln_backward(dy: np.ndarray, y: np.ndarray, inv: np.ndarray) -> np.ndarray:
    return inv * (dy - dy.mean(axis=-1, keepdims=True) - y * (dy * y).mean(axis=-1, keepdims=True))


def _act(name: str, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """act(z) and act'(z)."""
    if name == "gelu":
        t = np.tanh(_K * (z + 0.044715 * z**3))
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _K * (1.0 + 3 * 0.044715 * z * z)
        return 0.5 * z * (1.0 + t), d
    if name == "relu":
        return np.maximum(z, 0.0), (z > 0).astype(z.dtype)
    t = np.tanh(z)
    return t, 1.0 - t * t


def normalise_inputs(spec: SideNetSpec, tapped: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """(N, T, d) tapped states → the network's input after its (parameter-free) input norm.
    Applied once to a whole data set when training, not per batch."""
    a: np.ndarray = np.asarray(tapped, dtype=dtype)
    return _ln(a)[0] if spec.norm == "layernorm" else a


def init_weights(spec: SideNetSpec, seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(spec.width)
    w = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(spec).items()}
    for j in range(len(spec.taps)):
        for part in ("weight", "bias"):
            name = f"ladder.{j}.down.{part}"
            w[name] = rng.uniform(-bound, bound, w[name].shape).astype(np.float32)
    return w


def _forward(spec: SideNetSpec, w: Weights, a: np.ndarray) -> tuple[np.ndarray, list[tuple]]:
    """a (B, T, d) normalised → g (B, K), and what the backward pass needs."""
    cache: list[tuple] = []
    h = a[:, 0]
    for j in range(len(spec.taps)):
        mu = 0.0
        h_prev = h
        if j == 0:
            s = h
        else:
            mu = float(1.0 / (1.0 + np.exp(-float(w[f"ladder.{j}.alpha"][0]))))
            s = (1 - mu) * a[:, j] + mu * h
        z = s @ w[f"ladder.{j}.down.weight"].T + w[f"ladder.{j}.down.bias"]  # (B, r)
        u, du = _act(spec.activation, z)
        h = s + u @ w[f"ladder.{j}.up.weight"].T + w[f"ladder.{j}.up.bias"]  # (B, d)
        cache.append((s, u, du, mu, h_prev))
    hn, inv = _ln(h)
    cache.append((hn, inv))
    return hn @ w["out.weight"].T + w["out.bias"], cache  # (B, K)


def forward(spec: SideNetSpec, w: Weights, a: np.ndarray) -> np.ndarray:
    """a (B, T, d), already normalised (:func:`normalise_inputs`) → g (B, K)."""
    return _forward(spec, w, a)[0]


class SideNetForward:
    """An adapter's network, ready to predict: states (B, L+1, d) → g(A) (B, K)."""

    def __init__(self, spec: SideNetSpec, weights: Weights) -> None:
        self.spec = spec
        self.w = weights

    @classmethod
    def from_bytes(cls, spec: SideNetSpec, blob: bytes) -> SideNetForward:
        return cls(spec, decode_weights(blob, spec))

    def __call__(self, states: np.ndarray) -> np.ndarray:
        a = normalise_inputs(self.spec, states[:, list(self.spec.taps)])  # (B, T, d)
        return forward(self.spec, self.w, a).astype(np.float32)


def loss_and_grads(spec: SideNetSpec, w: Weights, a: np.ndarray, y: np.ndarray,
                   sample_weight: np.ndarray | None = None) -> tuple[float, Weights]:
    """``mean_i w_i·‖g(a_i) − y_i‖²`` and its gradient for every parameter (same names as ``w``)."""
    out, cache = _forward(spec, w, a)
    diff = out - y  # (B, K)
    per = (diff * diff).sum(axis=1)  # (B,)
    sw = np.ones(len(a), dtype=diff.dtype) if sample_weight is None else sample_weight.astype(diff.dtype)
    loss = float((sw * per).mean())
    dout = (2.0 / len(a)) * sw[:, None] * diff  # (B, K)
    g: Weights = {}
    hn, inv = cache[-1]
    g["out.weight"] = dout.T @ hn
    g["out.bias"] = dout.sum(axis=0)
    dh = _ln_backward(dout @ w["out.weight"], hn, inv)
    for j in reversed(range(len(spec.taps))):
        s, u, du, mu, h_prev = cache[j]
        g[f"ladder.{j}.up.weight"] = dh.T @ u
        g[f"ladder.{j}.up.bias"] = dh.sum(axis=0)
        dz = (dh @ w[f"ladder.{j}.up.weight"]) * du
        g[f"ladder.{j}.down.weight"] = dz.T @ s
        g[f"ladder.{j}.down.bias"] = dz.sum(axis=0)
        ds = dh + dz @ w[f"ladder.{j}.down.weight"]
        if j > 0:
            dmu = float((ds * (h_prev - a[:, j])).sum())
            g[f"ladder.{j}.alpha"] = np.array([dmu * mu * (1.0 - mu)], dtype=ds.dtype)
            dh = mu * ds
    return loss, g


class AdamW:
    """torch.optim.AdamW's update (defaults betas, eps; amsgrad off), parameter by parameter."""

    def __init__(self, params: Weights, lr: float, weight_decay: float) -> None:
        self.lr, self.wd = lr, weight_decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: Weights, grads: Weights) -> None:
        b1, b2 = BETAS
        self.t += 1
        bc1, bc2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        step_size = self.lr / bc1
        for k, p in params.items():
            gk = grads[k].astype(p.dtype, copy=False)
            p *= 1.0 - self.lr * self.wd
            m, v = self.m[k], self.v[k]
            m *= b1
            m += (1.0 - b1) * gk
            v *= b2
            v += (1.0 - b2) * gk * gk
            p -= step_size * m / (np.sqrt(v) / np.sqrt(bc2) + ADAM_EPS)


def weighted_loss(spec: SideNetSpec, w: Weights, a: np.ndarray, y: np.ndarray,
                  sample_weight: np.ndarray | None) -> float:
    d = forward(spec, w, a) - y
    per = (d * d).sum(axis=1)
    return float(per.mean() if sample_weight is None else (sample_weight * per).mean())


def train(
    spec: SideNetSpec,
    hyper: HyperParams,
    tapped: np.ndarray,  # (N, T, d): tapped states only
    targets: np.ndarray,  # (N, K)
    *,
    init: bytes | None = None,
    sample_weight: np.ndarray | None = None,  # (N,), mean 1: a cohort's capped shares
    on_epoch: Callable[[EpochReport], bool] | None = None,
) -> tuple[bytes, list[EpochReport]]:
    """Train as the server's trainer does; returns the adapter's safetensors bytes and the
    epochs' reports (with a validation slice: the weights of the epoch with the lowest
    validation loss). ``on_epoch`` returns False to stop (the best weights so far are returned)."""
    w = decode_weights(init, spec) if init is not None else init_weights(spec, hyper.seed)
    a = normalise_inputs(spec, tapped)
    y = np.asarray(targets, dtype=np.float32)
    sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
    opt = AdamW(w, hyper.lr, hyper.weight_decay)
    tr, va = split(len(a), hyper)
    best: tuple[float, Weights] | None = None
    reports: list[EpochReport] = []
    for epoch in range(1, hyper.epochs + 1):
        t0 = time.perf_counter()
        order = epoch_order(tr, hyper, epoch)
        total = 0.0
        for b in range(0, len(order), hyper.batch_size):
            idx = order[b : b + hyper.batch_size]
            loss, grads = loss_and_grads(spec, w, a[idx], y[idx], None if sw is None else sw[idx])
            opt.step(w, grads)
            total += loss * len(idx)
        val_loss = None
        if len(va):
            val_loss = weighted_loss(spec, w, a[va], y[va], None if sw is None else sw[va])
            if best is None or val_loss < best[0]:
                best = (val_loss, {k: v.copy() for k, v in w.items()})
        report = EpochReport(epoch, total / max(len(order), 1), val_loss, time.perf_counter() - t0)
        reports.append(report)
        if on_epoch is not None and not on_epoch(report):
            break
    final = best[1] if best is not None else w
    return encode_weights(final, spec), reports
