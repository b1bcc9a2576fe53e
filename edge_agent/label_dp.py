"""Label differential privacy: randomised response on each sample's label, drawn once.

k-ary randomised response with privacy parameter ε over C classes keeps the
true label with probability ``e^ε / (e^ε + C − 1)`` and otherwise reports one
of the C − 1 other classes uniformly at random. For any two labels y, y' and
any reported label z, ``P(z | y) ≤ e^ε · P(z | y')``: whatever the server
computes from the reported label (the residual ``onehot(z) − p_b``, mixed or
not) is ε-differentially private with respect to that sample's label.

The guarantee holds per sample only if the reported label is drawn ONCE: a
fresh draw in every round would let the server average the noise away (n
independent draws cost n·ε). The board therefore keeps the reported label in
its ledger (``samples.sent_label``) and sends the same one in every later
round. ``ε = inf`` turns the mechanism off (the true label is reported).

It protects the label as carried by the targets, nothing else: the pivot
activations carry the label too for a server with same-task public data
(README, "What the mixing hides"; ``sidetune bench privacy``).
"""

from __future__ import annotations

import math

import numpy as np


def keep_probability(epsilon: float, num_classes: int) -> float:
    """P(reported = true) for k-ary randomised response: ``e^ε / (e^ε + C − 1)`` (1 when ε = inf)."""
    if num_classes < 2:
        raise ValueError(f"randomised response needs at least 2 classes, not {num_classes}")
    if not epsilon > 0:
        raise ValueError(f"ε must be positive (inf turns label-DP off), not {epsilon}")
    if math.isinf(epsilon):
        return 1.0
    # e^ε / (e^ε + C − 1) = 1 / (1 + (C − 1)·e^−ε): no overflow for large ε
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def randomize(labels: np.ndarray, num_classes: int, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Reported labels: each kept with ``keep_probability``, else one of the other classes uniformly."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    keep = keep_probability(epsilon, num_classes)
    if keep == 1.0:
        return y.copy()
    flip = rng.random(y.shape) >= keep
    shift = rng.integers(1, num_classes, size=y.shape)  # 1..C−1: one of the other classes, uniformly
    return np.where(flip, (y + shift) % num_classes, y)
