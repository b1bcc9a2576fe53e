"""The board's calibration of the backbone's prior, fitted without labels and never sent.

The targets are ``M·(onehot(y) − p) + noise``. With the raw prior ``p_b`` their
norms name the classes: a prompt that leans to one class (the demo's says
" positive" for most reviews) leaves small residuals for that class and large
ones for the other, so the side of the targets' first principal component with
the larger norms is the class the backbone leans away from — read off with no
known example (README, "What the mixing hides"). The board therefore forms its
targets, and adds its side network's output, to a calibrated prior::

    p_cal = softmax(log p_b + b)

with one bias per class chosen so that the mean of ``p_cal`` over the board's
own training samples is uniform (a few fixed-point steps; no label is used).
Then the mean residual norm of a class is the same for every class on a board
whose classes are balanced (for two classes: ``1 − E[p|1] = E[p|0]`` exactly
when ``E[p] = ½`` and the classes are equal in number); what is left follows
which class is the board's majority — what the sizes of the two sides tell
anyway.

The bias is fitted once, at the board's first round, kept in
``<state_dir>/calibration.json`` and used in every later round and prediction,
so every adapter the board receives was trained against the prior it is added
to. A board whose state predates this file keeps predicting with ``p_b`` until
its next round fits one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from schemas.files import atomic_write

__all__ = ["CALIBRATION_FILE", "calibrate", "fit_prior_bias", "load_bias", "save_bias"]

CALIBRATION_FILE = "calibration.json"


def fit_prior_bias(prior: np.ndarray, steps: int = 200, tol: float = 1e-9) -> np.ndarray:
    """The bias b (C,) that makes the mean of ``softmax(log p + b)`` over the rows uniform."""
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"need a non-empty (N, C) prior, not shape {p.shape}")
    logp = np.log(np.clip(p, 1e-12, None))
    c = p.shape[1]
    b = np.zeros(c)
    for _ in range(steps):
        step = np.log(calibrate(logp, b, logits=True).mean(0) * c)
        b -= step
        if np.abs(step).max() < tol:
            break
    return b - b.mean()


def calibrate(prior: np.ndarray, bias: np.ndarray | None, logits: bool = False) -> np.ndarray:
    """``softmax(log p + b)`` (N, C) float64; ``p`` itself when there is no bias.
    ``logits=True``: ``prior`` holds ``log p`` already."""
    if bias is None:
        return np.exp(prior) if logits else np.asarray(prior, dtype=np.float64)
    z = (prior if logits else np.log(np.clip(np.asarray(prior, dtype=np.float64), 1e-12, None))) + bias
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def load_bias(state_dir: Path, num_classes: int) -> np.ndarray | None:
    """The board's bias, or None before its first round (or a file for another number of classes)."""
    path = Path(state_dir) / CALIBRATION_FILE
    try:
        bias = np.asarray(json.loads(path.read_text())["bias"], dtype=np.float64)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a calibration file ({e}); remove it to fit a new one") from None
    return bias if bias.shape == (num_classes,) and np.all(np.isfinite(bias)) else None


def save_bias(state_dir: Path, bias: np.ndarray, samples: int) -> None:
    atomic_write(Path(state_dir) / CALIBRATION_FILE,
                 json.dumps({"bias": [float(x) for x in bias], "fitted_on_samples": int(samples)}))
