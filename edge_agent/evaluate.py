"""Predictions on the board: ``argmax(p_cal + Mᵀ·g(A))`` (edge_agent/calibration.py), and held-out accuracy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.adapter import InstalledAdapter
from edge_agent.calibration import calibrate
from edge_agent.features import FeatureExtractor
from edge_agent.inbox import parse_jsonl
from edge_agent.secret import DeviceSecret
from schemas.files import atomic_write_with


def probabilities(prior: np.ndarray, states: np.ndarray, adapter: InstalledAdapter | None,
                  secret: DeviceSecret) -> np.ndarray:
    """Scores ``p_b + Mᵀ·g(A)`` (N, C); the backbone's prior alone before any adapter."""
    if adapter is None:
        return prior
    g = adapter.forward(states)  # (N, K)
    return prior + secret.unmix(g, prior.shape[1]).astype(np.float32)


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores clipped at 0 and normalised per row, for display (the argmax is unchanged)."""
    clipped = np.clip(scores, 0.0, None) + 1e-9
    return clipped / clipped.sum(axis=1, keepdims=True)


@dataclass
class Holdout:
    labels: np.ndarray  # (N,)
    prior: np.ndarray  # (N, C)
    states: np.ndarray  # (N, L+1, d) float16 (kept small)

    def accuracy(self, adapter: InstalledAdapter | None, secret: DeviceSecret,
                 bias: np.ndarray | None = None) -> float:
        """With an adapter, added to the calibrated prior (``bias``); without, the backbone alone."""
        prior = self.prior if adapter is None else calibrate(self.prior, bias).astype(np.float32)
        scores = probabilities(prior, self.states.astype(np.float32), adapter, secret)
        return float(np.mean(scores.argmax(axis=1) == self.labels))


def load_holdout(path: Path, fx: FeatureExtractor, cache_dir: Path) -> Holdout:
    """Features of a held-out JSONL file, computed once and cached next to the ledger."""
    digest = hashlib.sha256(path.read_bytes() + fx.identity().encode()).hexdigest()[:16]
    cached = cache_dir / f"holdout-{digest}.npz"
    if cached.exists():
        with np.load(cached, allow_pickle=False) as z:
            return Holdout(z["labels"], z["prior"], z["states"])
    parsed = parse_jsonl(path, fx.task.classes)
    if not parsed.good:
        raise ValueError(f"held-out file {path} has no usable lines: {parsed.errors[:3]}")
    texts = [t for t, _ in parsed.good]
    labels = np.array([fx.task.label_index(y) for _, y in parsed.good])
    f = fx.extract(texts)
    h = Holdout(labels, f.prior, f.states.astype(np.float16))
    atomic_write_with(cached, lambda f: np.savez(f, labels=h.labels, prior=h.prior, states=h.states))
    return h
