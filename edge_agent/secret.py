"""The device secret: the HMAC key of sample keys and the mixing matrix M.

Created on first start in the state directory (mode 0600) and never sent.
``M`` (K×C) has orthonormal columns; the other K−C directions of a random
orthogonal basis carry noise, so the server sees ``M·(onehot(y) − p_b) + noise``
and does not learn which class is which. It still sees the class partition
(the first principal component of the targets splits the samples by class,
DESIGN.md §2.5) and, at any noise level that costs little accuracy, the number
of classes (C − 1 components stand out of the noise floor). The mixing alone is
not label differential privacy: the labels ``targets`` is given are the ones
randomised response reported (edge_agent/label_dp.py, drawn once per sample
and kept in the ledger), so the partition the server reads is of those.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.files import atomic_write


@dataclass(frozen=True)
class DeviceSecret:
    key: bytes
    basis: np.ndarray  # (K, K) orthogonal; first C columns are M

    @classmethod
    def generate(cls, out_dim: int, rng: np.random.Generator | None = None) -> DeviceSecret:
        """A new secret: 32 random key bytes and a uniformly random orthogonal (K, K) basis."""
        rng = rng or np.random.default_rng(int.from_bytes(secrets.token_bytes(16), "little"))
        q, r = np.linalg.qr(rng.normal(size=(out_dim, out_dim)))
        return cls(secrets.token_bytes(32), q * np.sign(np.diag(r)))

    def mixing(self, num_classes: int) -> np.ndarray:
        """M: (K, C)."""
        return self.basis[:, :num_classes]

    def targets(self, labels: np.ndarray, prior: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
        """``M·(onehot(y) − p_b) + Q_⊥·ε`` for each sample: (N, K) float32. ``labels`` are the reported
        (randomised) labels, not necessarily the true ones."""
        n, c = prior.shape
        residual = np.eye(c, dtype=np.float64)[labels] - prior  # (N, C)
        t = residual @ self.mixing(c).T  # (N, K)
        rest = self.basis[:, c:]  # (K, K−C)
        if rest.shape[1] and noise_std > 0:
            t = t + rng.normal(0.0, noise_std, size=(n, rest.shape[1])) @ rest.T
        return t.astype(np.float32)

    def unmix(self, g: np.ndarray, num_classes: int) -> np.ndarray:
        """Mᵀ·g: (N, K) → (N, C)."""
        return g @ self.mixing(num_classes)


def cohort_secret_json(cohort: str, out_dim: int) -> str:
    """A new cohort secret (made off the server, handed to every member): a shared mixing basis."""
    basis = DeviceSecret.generate(out_dim).basis
    return json.dumps({"cohort": cohort, "out_dim": out_dim, "basis": basis.tolist()})


def with_cohort_basis(own: DeviceSecret, path: Path, cohort: str, out_dim: int) -> DeviceSecret:
    """The board's secret with the cohort's shared basis: sample keys stay the board's own (its
    HMAC key never leaves it), its targets are mixed as every member's are."""
    try:
        data = json.loads(path.read_text())
        basis = np.asarray(data["basis"], dtype=np.float64)
        name = data["cohort"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the cohort secret {path}: {e}") from None
    if name != cohort:
        raise ValueError(f"{path} is the secret of cohort {name!r}, this board is in {cohort!r}")
    if basis.shape != (out_dim, out_dim) or not np.allclose(basis.T @ basis, np.eye(out_dim), atol=1e-8):
        raise ValueError(f"{path} does not hold an orthogonal {out_dim}x{out_dim} basis (out_dim is {out_dim}): "
                         f"make it with `sidetune cohort secret {cohort} --out-dim {out_dim}`")
    return DeviceSecret(own.key, basis)


def load_or_create(state_dir: Path, out_dim: int) -> DeviceSecret:
    path = state_dir / "secret.json"
    if path.exists():
        data = json.loads(path.read_text())
        basis = np.asarray(data["basis"], dtype=np.float64)
        if basis.shape != (out_dim, out_dim):
            raise ValueError(f"{path} holds a {basis.shape[0]}-wide secret but out_dim is {out_dim}; "
                             "keep out_dim, or start a new state directory")
        return DeviceSecret(bytes.fromhex(data["key"]), basis)
    fresh = DeviceSecret.generate(out_dim)
    atomic_write(path, json.dumps({"key": fresh.key.hex(), "basis": fresh.basis.tolist()}))
    return fresh
