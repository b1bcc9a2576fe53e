"""``sidetune bench accuracy``: held-out accuracy of the side network on the real model and data.

``train + holdout`` Rotten Tomatoes snippets are drawn once (a fixed seed).
For each task (a prompt and its verbalizers), the backbone runs once over
them, as the board would (features cached on disk, keyed by the backbone's
fingerprint, the task, the maximum length and the texts). Then, for each of
``splits`` random splits of them into ``train`` training and ``holdout``
held-out samples, three predictions are scored on the held-out part:

* ``zero_shot``: ``argmax p_b``, the backbone alone;
* ``recalibrated``: the backbone alone with one bias per class fitted on the
  training split (``argmax(log p_b + b)``): what the labels buy without any
  side network, so a prompt whose prediction leans to one class does not make
  the side network look better than it is;
* ``mixed``: the product, the side network trained by the server's trainer on
  ``M·(onehot(y) − p_b)`` plus noise (K = 8, a fresh device secret per split)
  and run by the board's numpy forward pass, ``argmax(p_b + Mᵀ·g(A))``;
* ``clear``: the same network trained on ``onehot(y) − p_b`` (K = C), the
  labels in the clear; ``clear − mixed`` is what the privacy costs.

Each figure is the mean and standard deviation over the splits, so it is not
one shard's luck. ``compare_on_features`` is the part that needs no backbone.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.backbone import Backbone
from edge_agent.config import EdgeSettings
from edge_agent.features import FeatureExtractor, default_taps
from edge_agent.secret import DeviceSecret
from edge_agent.sidenet import SideNetForward
from edge_agent.task import TaskSpec
from schemas.files import atomic_write_with
from schemas.spec import HyperParams, SideNetSpec
from sidetune.data import CLASSES, Review

_AGENT = EdgeSettings.model_fields  # the bench trains what an agent with default settings asks for
OUT_DIM, BOTTLENECK, NOISE_STD = (_AGENT[k].default for k in ("out_dim", "bottleneck", "noise_std"))
MAX_LENGTH = _AGENT["max_length"].default

PLAIN_TASK = {"name": "rotten-tomatoes-plain", "template": "Review: {text}\nSentiment:",
              "classes": list(CLASSES), "verbalizers": [" positive", " negative"]}
CHUNK = 256

Progress = Callable[[str], None]


@dataclass
class TaskFeatures:
    states: np.ndarray  # float16 (N, L+1, d)
    prior: np.ndarray  # float32 (N, C)
    labels: np.ndarray  # int64 (N,)


def builtin_task(name: str) -> TaskSpec:
    """``chat`` (the demo's task) or ``plain``; anything else is a TOML file."""
    from schemas import toml
    from sidetune.demo import TASK

    if name == "chat":
        return TaskSpec.from_dict(toml.loads(TASK))
    if name == "plain":
        return TaskSpec.from_dict(PLAIN_TASK)
    return TaskSpec.from_toml(name)


def extract_all(backbone: Backbone, task: TaskSpec, reviews: Sequence[Review], cache_dir: Path,
                max_length: int = 128, progress: Progress = print) -> TaskFeatures:
    """Pivot states and prior of every review under ``task``, computed once and cached."""
    labels = np.array([task.label_index(r.label) for r in reviews], dtype=np.int64)
    fx = FeatureExtractor(backbone, task, max_length=max_length)
    texts = hashlib.sha256("\0".join(r.text for r in reviews).encode()).hexdigest()
    path = cache_dir / f"features-{hashlib.sha256((fx.identity() + texts).encode()).hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            progress(f"{task.name}: features of {len(reviews)} reviews from {path}")
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
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda f: np.savez(f, states=out.states, prior=out.prior), mode=0o644)
    return out


def fit_bias(prior: np.ndarray, labels: np.ndarray, steps: int = 500) -> np.ndarray:
    """Per-class bias b minimising the cross-entropy of softmax(log p + b) (convex; gradient descent)."""
    logp = np.log(np.clip(prior.astype(np.float64), 1e-12, None))
    onehot = np.eye(prior.shape[1])[labels]
    b = np.zeros(prior.shape[1])
    for _ in range(steps):
        z = logp + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        b -= 2.0 * (p - onehot).mean(0)
    return b


def _scores(spec: SideNetSpec, hyper: HyperParams, f: TaskFeatures, tr: np.ndarray, te: np.ndarray,
            targets: np.ndarray) -> np.ndarray:
    """Train on ``tr`` with the server's trainer; g(A) of ``te`` by the board's forward pass."""
    from side_server.trainer import train

    taps = list(spec.taps)
    net, _ = train(spec, hyper, f.states[tr][:, taps].astype(np.float32), targets)
    return SideNetForward.from_bytes(spec, net.to_weights())(f.states[te])


def compare_on_features(f: TaskFeatures, *, train: int, holdout: int, splits: int, hyper: HyperParams,
                        out_dim: int = OUT_DIM, bottleneck: int = BOTTLENECK, noise_std: float = NOISE_STD,
                        seed: int = 0,
                        progress: Progress = print) -> dict[str, Any]:
    n, states_per_sample, width = f.states.shape
    c = f.prior.shape[1]
    if train + holdout > n:
        raise ValueError(f"--train {train} + --holdout {holdout} is more than the {n} samples there are")
    taps = tuple(default_taps(states_per_sample - 1))
    mixed_spec = SideNetSpec(num_states=states_per_sample, width=width, taps=taps, bottleneck=bottleneck,
                             out_dim=out_dim)
    clear_spec = mixed_spec.model_copy(update={"out_dim": c})
    prior = f.prior.astype(np.float64)
    acc: dict[str, list[float]] = {"zero_shot": [], "recalibrated": [], "mixed": [], "clear": []}
    for s in range(splits):
        rng = np.random.default_rng([seed, s])
        perm = rng.permutation(n)
        tr, te = perm[:train], perm[train : train + holdout]
        y = f.labels[te]
        secret = DeviceSecret.generate(out_dim, rng)
        g = _scores(mixed_spec, hyper, f, tr, te, secret.targets(f.labels[tr], f.prior[tr], noise_std, rng))
        clear = (np.eye(c)[f.labels[tr]] - prior[tr]).astype(np.float32)
        g_clear = _scores(clear_spec, hyper, f, tr, te, clear)
        acc["zero_shot"].append(float(np.mean(prior[te].argmax(1) == y)))
        b = fit_bias(prior[tr], f.labels[tr])
        acc["recalibrated"].append(float(np.mean((np.log(np.clip(prior[te], 1e-12, None)) + b).argmax(1) == y)))
        acc["mixed"].append(float(np.mean((prior[te] + secret.unmix(g, c)).argmax(1) == y)))
        acc["clear"].append(float(np.mean((prior[te] + g_clear).argmax(1) == y)))
        progress(f"split {s + 1}/{splits}: " + "  ".join(f"{k} {v[-1]:.3f}" for k, v in acc.items()))
    return {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "splits": v} for k, v in acc.items()}


def run_accuracy_bench(backbone_dir: Path, tasks: Sequence[str], *, train: int, holdout: int, splits: int,
                       epochs: int, cache_dir: Path, noise_std: float | None = None, json_path: Path | None = None,
                       progress: Progress = print) -> dict[str, Any]:
    from sidetune.data import load_reviews

    chosen = [(name, builtin_task(name)) for name in tasks]  # a bad task file fails before any work
    backbone = Backbone.load(backbone_dir, threads=2)
    reviews = load_reviews()
    if train + holdout > len(reviews):
        raise ValueError(f"--train {train} + --holdout {holdout} is more than the {len(reviews)} reviews there are")
    reviews = [reviews[i] for i in np.random.default_rng(0).permutation(len(reviews))[: train + holdout]]
    hyper = HyperParams(epochs=epochs)
    noise = NOISE_STD if noise_std is None else noise_std
    report: dict[str, Any] = {"backbone": backbone.fingerprint, "reviews": len(reviews), "train": train,
                              "holdout": holdout, "splits": splits, "hyper": hyper.model_dump(),
                              "noise_std": noise, "tasks": []}
    for name, task in chosen:
        t0 = time.perf_counter()
        f = extract_all(backbone, task, reviews, cache_dir, MAX_LENGTH, progress)
        res = compare_on_features(f, train=train, holdout=holdout, splits=splits, hyper=hyper, noise_std=noise,
                                  progress=progress)
        report["tasks"].append({"task": name, "template": task.template, "verbalizers": list(task.verbalizers),
                                "seconds": round(time.perf_counter() - t0, 1), **res})
    print(format_report(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"held-out accuracy, mean ± std over {report['splits']} random splits of {report['reviews']} reviews "
             f"({report['train']} train / {report['holdout']} held out, {report['hyper']['epochs']} epochs, "
             f"noise {report['noise_std']})",
             f"{'task':>8} {'zero-shot':>15} {'recalibrated':>15} {'mixed (product)':>17} {'labels in clear':>17}"
             f" {'seconds':>8}"]
    for t in report["tasks"]:
        c = [f"{t[k]['mean']:.3f} ± {t[k]['std']:.3f}" for k in ("zero_shot", "recalibrated", "mixed", "clear")]
        lines.append(f"{t['task'][:8]:>8} {c[0]:>15} {c[1]:>15} {c[2]:>17} {c[3]:>17} {t['seconds']:>8.0f}")
    return "\n".join(lines)
