"""Per-sample features the device computes once: pivot states of every layer + the prior.

fx = FeatureExtractor(backbone, task, max_length=128, batch_size=8)
f = fx.extract(["a fine film", "a dull one"])
f.token_ids  # list[list[int]]  (what the sample key is derived from)
f.states     # float32 [N, L+1, d]  (index 0 = embedding output)
f.prior      # float32 [N, C]  softmax over the verbalizer logits (uniform without a head)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .backbone import Backbone
from .task import TaskSpec


def default_taps(num_layers: int) -> list[int]:
    """Every third layer plus the last, indexing pivot_states (0 = embeddings): [3, 6, ..., L]."""
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    taps = list(range(3, num_layers + 1, 3))
    if not taps or taps[-1] != num_layers:
        taps.append(num_layers)
    return taps


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


@dataclass
class Features:
    token_ids: list[list[int]]
    states: np.ndarray  # float32 [N, L+1, d]
    prior: np.ndarray  # float32 [N, C]

    def __len__(self) -> int:
        return len(self.token_ids)


class FeatureExtractor:
    def __init__(
        self, backbone: Backbone, task: TaskSpec, max_length: int = 128, batch_size: int = 8
    ):
        self.backbone = backbone
        self.task = task
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        #: Called after every backbone batch (the agent's watchdog; a long phase stays alive).
        self.on_batch: Callable[[], None] | None = None
        # Checked up front: a bad verbalizer is a configuration error, not a per-sample one.
        self.verbalizer_ids: list[int] | None = (
            task.verbalizer_ids(backbone) if backbone.has_logits else None
        )
        backbone.encode(["x"], self.max_length)  # validates max_length against the model

    def identity(self) -> str:
        """What decides the features besides the text: backbone, task (prompt, verbalizers), truncation.
        A cache of features must be keyed by it, so that none is reused under another."""
        return json.dumps([self.backbone.fingerprint, self.task.to_dict(), self.max_length], sort_keys=True)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Prompted, truncated token ids (the key material), without running the backbone."""
        return self.backbone.encode([self.task.prompt(t) for t in texts], self.max_length)

    def from_token_ids(self, token_ids: list[list[int]]) -> Features:
        n = len(token_ids)
        c = self.task.num_classes
        if n == 0:
            shape = (0, self.backbone.num_layers + 1, self.backbone.hidden_size)
            return Features([], np.zeros(shape, np.float32), np.zeros((0, c), np.float32))
        states, logits = self.backbone.run(token_ids, batch_size=self.batch_size, on_batch=self.on_batch)
        if logits is None or self.verbalizer_ids is None:
            prior = np.full((n, c), 1.0 / c, dtype=np.float32)
        else:
            prior = softmax(logits[:, self.verbalizer_ids]).astype(np.float32)
        return Features(token_ids=token_ids, states=states, prior=prior)

    def extract(self, texts: Sequence[str]) -> Features:
        if isinstance(texts, str):
            raise TypeError("extract() takes a sequence of texts, not one string")
        return self.from_token_ids(self.token_ids(texts))
