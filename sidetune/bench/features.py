"""What the benchmarks share: the built-in tasks, the board's features of a data set (cached), and
the side network trained by the server's trainer and run by the board's numpy forward pass.

    task = builtin_task("chat")                      # or "plain", "news", a task TOML
    f = extract_all(backbone, task, rows, cache_dir)  # TaskFeatures: fp16 states (N, L+1, d), prior, labels
    g = side_scores(spec, hyper, f, tr, te, targets)  # g(A) of the held-out rows, (len(te), K)

Used by ``sidetune bench accuracy``, ``privacy`` and ``compare``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.backbone import Backbone
from edge_agent.config import EdgeSettings
from edge_agent.features import FeatureExtractor
from edge_agent.task import TaskSpec
from schemas.files import atomic_write_with
from schemas.sidenet import SideNetForward
from schemas.spec import HyperParams, SideNetSpec
from sidetune.data import CLASSES, NEWS_CLASSES, Review

_AGENT = EdgeSettings.model_fields  # the benches train what an agent with default settings asks for
OUT_DIM, BOTTLENECK, NOISE_STD = (_AGENT[k].default for k in ("out_dim", "bottleneck", "noise_std"))
MAX_LENGTH = _AGENT["max_length"].default
WIRE_STATES = _AGENT["wire_states"].default  # which pivot states an agent sends

PLAIN_TASK = {"name": "rotten-tomatoes-plain", "template": "Review: {text}\nSentiment:",
              "classes": list(CLASSES), "verbalizers": [" positive", " negative"]}
#: The second data set (sidetune.data.load_news): which outlet published a news article, in the
#: backbone's chat format like the demo's task; each verbalizer one token of SmolLM2's vocabulary.
NEWS_TASK = {"name": "news-outlets",
             "template": "<|im_start|>user\nWhich news outlet published this article: BBC, CNN, ABC News, DW, "
                         "China Daily, HuffPost or Al Jazeera?\n\n{text}<|im_end|>\n<|im_start|>assistant\n"
                         "The outlet is",
             "classes": list(NEWS_CLASSES),
             "verbalizers": [" BBC", " CNN", " ABC", " DW", " China", " Huff", " Al"]}
CHUNK = 256

Progress = Callable[[str], None]


@dataclass
class TaskFeatures:
    states: np.ndarray  # float16 (N, L+1, d)
    prior: np.ndarray  # float32 (N, C)
    labels: np.ndarray  # int64 (N,)


def builtin_task(name: str) -> TaskSpec:
    """``chat`` (the demo's task), ``plain``, ``news``; anything else is a TOML file."""
    from schemas import toml
    from sidetune.demo import TASK

    if name == "chat":
        return TaskSpec.from_dict(toml.loads(TASK))
    if name == "plain":
        return TaskSpec.from_dict(PLAIN_TASK)
    if name == "news":
        return TaskSpec.from_dict(NEWS_TASK)
    return TaskSpec.from_toml(name)


def extract_all(backbone: Backbone, task: TaskSpec, reviews: Sequence[Review], cache_dir: Path | None,
                max_length: int = 128, progress: Progress = print) -> TaskFeatures:
    """Pivot states and prior of every row under ``task``, computed once and cached in ``cache_dir``
    (``None``: always computed, never cached — what a benchmark that times the board does)."""
    labels = np.array([task.label_index(r.label) for r in reviews], dtype=np.int64)
    fx = FeatureExtractor(backbone, task, max_length=max_length)
    texts = hashlib.sha256("\0".join(r.text for r in reviews).encode()).hexdigest()
    name = f"features-{hashlib.sha256((fx.identity() + texts).encode()).hexdigest()[:16]}.npz"
    path = cache_dir / name if cache_dir is not None else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            progress(f"{task.name}: features of {len(reviews)} rows from {path}")
            return TaskFeatures(z["states"], z["prior"], labels)
    states, prior = [], []
    t0 = time.perf_counter()
    for i in range(0, len(reviews), CHUNK):
        f = fx.extract([r.text for r in reviews[i : i + CHUNK]])
        states.append(f.states.astype(np.float16))  # what the wire carries
        prior.append(f.prior)
        done, took = min(i + CHUNK, len(reviews)), time.perf_counter() - t0
        progress(f"{task.name}: forward passes {done}/{len(reviews)} ({took:.0f} s, "
                 f"~{took / done * (len(reviews) - done):.0f} s left)")
    out = TaskFeatures(np.concatenate(states), np.concatenate(prior), labels)
    if path is not None and cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_with(path, lambda f: np.savez(f, states=out.states, prior=out.prior), mode=0o644)
    return out


def side_scores(spec: SideNetSpec, hyper: HyperParams, f: TaskFeatures, tr: np.ndarray, te: np.ndarray,
                targets: np.ndarray, train_states: np.ndarray | None = None) -> np.ndarray:
    """Train on ``tr`` with the server's trainer; g(A) of ``te`` by the board's forward pass.

    ``train_states`` (tapped, float32): what the server received instead of ``f.states[tr]`` (e.g. the
    int8 wire's decoded states); the board still predicts from its own states."""
    from side_server.trainer import train

    taps = list(spec.taps)
    x = f.states[tr][:, taps].astype(np.float32) if train_states is None else train_states
    net, _ = train(spec, hyper, x, targets)
    return SideNetForward.from_bytes(spec, net.to_weights())(f.states[te])
