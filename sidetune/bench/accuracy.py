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

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.backbone import Backbone
from edge_agent.features import default_taps
from edge_agent.secret import DeviceSecret
from schemas.spec import HyperParams, SideNetSpec

# The feature extraction (with its cache) and the side network's train-and-score are shared with the
# other benchmarks (privacy, compare): they live in sidetune/bench/features.py.
from sidetune.bench.features import (  # noqa: F401  (re-exported for sidetune.bench.privacy)
    BOTTLENECK,
    MAX_LENGTH,
    NOISE_STD,
    OUT_DIM,
    PLAIN_TASK,
    Progress,
    TaskFeatures,
    builtin_task,
    extract_all,
    side_scores,
)


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
        g = side_scores(mixed_spec, hyper, f, tr, te, secret.targets(f.labels[tr], f.prior[tr], noise_std, rng))
        clear = (np.eye(c)[f.labels[tr]] - prior[tr]).astype(np.float32)
        g_clear = side_scores(clear_spec, hyper, f, tr, te, clear)
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
