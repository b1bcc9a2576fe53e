"""The training schedule both trainers follow (the server's torch one and the board's numpy one):
the validation split, the batch order of each epoch, and what an epoch reports.

Fixed by the job's seed, so a job trained on the server and the same job trained on
the board see the same samples in the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.spec import HyperParams


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    val_loss: float | None
    seconds: float


def split(n: int, hyper: HyperParams) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices of ``n`` samples (no validation below 10 samples)."""
    perm = np.random.default_rng(hyper.seed).permutation(n)
    n_val = int(round(n * hyper.val_fraction)) if n >= 10 else 0
    return perm[n_val:], perm[:n_val]


def epoch_order(train: np.ndarray, hyper: HyperParams, epoch: int) -> np.ndarray:
    """The training indices in the order of ``epoch``'s batches."""
    return train[np.random.default_rng(hyper.seed * 1000 + epoch).permutation(len(train))]
