"""``sidetune bench privacy``: each attack a curious server can run, against each defence, with its cost.

Setup (DESIGN.md §8, issue 12). ``public + train + holdout`` Rotten Tomatoes
reviews are drawn once (the seed of ``sidetune bench accuracy``, so the two
share feature caches); for each of ``splits`` random splits, ``public`` of
them are the server's own labelled data, ``train`` the device's training
samples, ``holdout`` the device's held-out samples. The backbone runs once
over all of them under the device's prompt, and once under a prompt the
server guesses (``plain`` for the chat task, ``chat`` otherwise).

Per defence, the product's own code paths: the board's randomised response
(``edge_agent.label_dp.randomize``, as ``Ledger.draw_sent_labels`` uses it) and
its targets (``DeviceSecret.targets``, K = 8, the agent's ``noise_std``) formed
against its calibrated prior ``p_cal`` (``edge_agent.calibration``, fitted on
the device's training priors without labels), the
server's trainer (``side_server.trainer.train``, the agent's default
``HyperParams``), the board's numpy forward pass for the held-out accuracy
``argmax(p_cal + Mᵀ·g(A))``. Defences: ``none`` (``label_epsilon = inf``), ``label_dp``
(the agent's default ε), ``label_dp_eps1`` (ε = 1) and ``label_dp_uncalibrated``
(the default ε with the raw prior ``p_b``, as the board did before its
calibration: what the calibration changes); and, in the command,
``board_training`` (``train_on = "board"``: the board's numpy trainer,
``schemas.sidenet.train``, on targets of the true labels without noise,
as ``Rounds`` builds them): nothing but the board's status leaves the board, so
every attack is null (there are no targets, activations or weights to read),
and its ``device_cpu_s`` adds the measured training CPU to the forward passes.

Attacks, each scored as accuracy against the device's TRUE labels of its
training samples (what the server received):

* ``residual_argmax``: argmax of the first C coordinates of each target, as sent;
* ``targets_pc1_norm``: the sign of the targets' first principal component
  splits the samples; the side whose targets are larger is named the class the
  backbone leans away from (``onehot(y) − p_b`` is small where the backbone is
  already right). The lean is read from the public reviews' priors under the
  true prompt. No known device example. Two classes only (else null);
* ``targets_pc1_count``: the same split, the larger side named the class that is
  the majority among the public reviews (what is left once the norms are calibrated:
  the sizes of the sides);
* ``pca_one_known``: the same split, the flip resolved by one known device example;
* ``model_output``: the side network the server trained, run on the device's
  cached activations; a logistic probe on its K outputs fitted to the public
  reviews (through the same network) names the classes;
* ``public_probe_true_prompt``: a logistic probe on one tapped layer's pivot
  states of the public reviews (layer and L2 chosen on a public validation
  slice, features standardised with the public statistics), applied to the
  device's uploaded activations;
* ``public_probe_guessed_prompt``: the same, public reviews run with the guessed
  prompt, each side standardised with its own statistics;
* ``text_match``: the share of the device's samples whose text the server finds
  as the nearest of all ``public + train + holdout`` candidate texts run with the
  true prompt (cosine, last tapped layer); ``text_match_guessed_prompt``: the
  same with candidates run with the guessed prompt (own standardisation).
  Chance: 1 / candidates.

``device_cpu_s``: the board's CPU seconds for the device's training samples:
forward passes (process CPU time per sample, measured on this machine) plus the
defence's own board work (randomised response and targets, measured).
"""

from __future__ import annotations

import html
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.calibration import calibrate, fit_prior_bias
from edge_agent.config import EdgeSettings
from edge_agent.features import default_taps
from edge_agent.label_dp import keep_probability, randomize
from edge_agent.secret import DeviceSecret
from schemas.sidenet import SideNetForward
from schemas.spec import HyperParams, SideNetSpec
from sidetune.bench.accuracy import BOTTLENECK, MAX_LENGTH, NOISE_STD, OUT_DIM, TaskFeatures

Progress = Callable[[str], None]

DEFAULT_EPSILON: float = EdgeSettings.model_fields["label_epsilon"].default
TARGET_ATTACKS = ("residual_argmax", "targets_pc1_norm", "targets_pc1_count", "pca_one_known")
LABEL_ATTACKS = (*TARGET_ATTACKS, "model_output", "public_probe_true_prompt", "public_probe_guessed_prompt")
TEXT_ATTACKS = ("text_match", "text_match_guessed_prompt")
ATTACKS = (*LABEL_ATTACKS, *TEXT_ATTACKS)


def defences(default_epsilon: float = DEFAULT_EPSILON) -> dict[str, dict[str, Any]]:
    """name → params; ``epsilon`` None = no randomised response."""
    return {"none": {"epsilon": None}, "label_dp": {"epsilon": default_epsilon}, "label_dp_eps1": {"epsilon": 1.0},
            "label_dp_uncalibrated": {"epsilon": default_epsilon, "calibrated": False}}


# ------------------------------------------------------------------ attack helpers


def _pc1(x: np.ndarray) -> np.ndarray:
    xc = x.astype(np.float64) - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[0]


def _layer_norm(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def _standardise(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (x - ref.mean(0)) / (ref.std(0) + 1e-6)


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, l2: float) -> np.ndarray:
    """Multinomial logistic regression (with a bias column), L-BFGS; returns W (d+1, C)."""
    import torch

    xt = torch.from_numpy(np.hstack([x, np.ones((len(x), 1))]).astype(np.float64))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    w = torch.zeros(xt.shape[1], classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w, yt) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def predict_logistic(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray((np.hstack([x, np.ones((len(x), 1))]) @ w).argmax(1))


def public_probe(pub: np.ndarray, pub_y: np.ndarray, dev: np.ndarray, classes: int, own_stats: bool,
                 rng: np.random.Generator) -> np.ndarray:
    """Predicted labels of ``dev`` (N, T, d) from a probe trained on ``pub`` (P, T, d): the layer and L2
    chosen on a fifth of the public data, then refitted on all of it."""
    pub, dev = _layer_norm(pub), _layer_norm(dev)
    perm = rng.permutation(len(pub))
    fit, val = perm[len(pub) // 5:], perm[: len(pub) // 5]
    best = (-1.0, 0, 1e-2)
    for layer in range(pub.shape[1]):
        xp = _standardise(pub[:, layer], pub[fit, layer])
        for l2 in (1e-3, 1e-2, 1e-1):
            w = fit_logistic(xp[fit], pub_y[fit], classes, l2)
            acc = float(np.mean(predict_logistic(w, xp[val]) == pub_y[val]))
            if acc > best[0]:
                best = (acc, layer, l2)
    _, layer, l2 = best
    xp = _standardise(pub[:, layer], pub[:, layer])
    xd = _standardise(dev[:, layer], dev[:, layer] if own_stats else pub[:, layer])
    return predict_logistic(fit_logistic(xp, pub_y, classes, l2), xd)


def text_match(queries: np.ndarray, candidates: np.ndarray, truth: np.ndarray, own_stats: bool) -> float:
    """Share of queries (N, d) whose nearest candidate (M, d) by cosine is ``truth``'s row."""
    q, c = _layer_norm(queries), _layer_norm(candidates)
    if own_stats:
        q, c = _standardise(q, q), _standardise(c, c)
    q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
    c /= np.linalg.norm(c, axis=1, keepdims=True) + 1e-12
    hits = 0
    for i in range(0, len(q), 512):
        hits += int(np.sum((q[i : i + 512] @ c.T).argmax(1) == truth[i : i + 512]))
    return hits / len(q)


def target_attacks(targets: np.ndarray, y: np.ndarray, classes: int, lean: int,
                   majority: int | None = None) -> dict[str, float | None]:
    """The attacks on the targets alone (``lean``: the class the backbone favours on public data;
    ``majority``: the most frequent class of the public data, ``lean`` when not given)."""
    out: dict[str, float | None] = {
        "residual_argmax": float(np.mean(targets[:, :classes].argmax(1) == y)),
        "targets_pc1_norm": None, "targets_pc1_count": None, "pca_one_known": None}
    if classes != 2:
        return out
    side = _pc1(targets) > 0
    norm = np.linalg.norm(targets, axis=1)
    big = bool(norm[side].mean() > norm[~side].mean())  # the side with the larger residuals
    other = 1 - lean
    guess = np.where(side == big, other, lean)
    out["targets_pc1_norm"] = float(np.mean(guess == y))
    most = lean if majority is None else majority
    larger = bool(side.sum() * 2 > len(side))  # the side with more samples
    out["targets_pc1_count"] = float(np.mean(np.where(side == larger, most, 1 - most) == y))
    known = np.where(side == side[0], y[0], 1 - y[0])  # one device example known
    out["pca_one_known"] = float(np.mean(known == y))
    return out


# ------------------------------------------------------------------ the bench on features


@dataclass
class Split:
    public: np.ndarray
    train: np.ndarray
    holdout: np.ndarray


def privacy_on_features(dev: TaskFeatures, guessed: TaskFeatures, *, public: int, train: int, holdout: int,
                        splits: int, hyper: HyperParams, cpu_per_sample: float, default_epsilon: float = DEFAULT_EPSILON,
                        out_dim: int = OUT_DIM, bottleneck: int = BOTTLENECK, noise_std: float = NOISE_STD,
                        seed: int = 0, board_training: bool = False, progress: Progress = print) -> dict[str, Any]:
    """Every attack against every defence, per split; returns the per-split figures.
    ``board_training`` adds the board-only defence (trained on the board, nothing sent)."""
    from schemas.sidenet import train as board_train
    from side_server.trainer import train as server_train

    n, states_per_sample, width = dev.states.shape
    c = dev.prior.shape[1]
    if public + train + holdout > n:
        raise ValueError(f"--public {public} + --train {train} + --holdout {holdout} is more than the {n} samples")
    taps = tuple(default_taps(states_per_sample - 1))
    spec = SideNetSpec(num_states=states_per_sample, width=width, taps=taps, bottleneck=bottleneck, out_dim=out_dim)
    chosen = defences(default_epsilon)
    if board_training:
        chosen["board_training"] = {"epsilon": None, "train_on": "board"}
    per: dict[str, dict[str, Any]] = {name: {"task_accuracy": [], "device_cpu_s": [], "keep": [],
                                             "attacks": {a: [] for a in ATTACKS}} for name in chosen}
    prior = dev.prior.astype(np.float64)
    tapped = dev.states[:, list(taps)]
    tapped_guess = guessed.states[:, list(taps)]
    for s in range(splits):
        rng = np.random.default_rng([seed, s])
        perm = rng.permutation(n)
        sp = Split(perm[:public], perm[public : public + train], perm[public + train : public + train + holdout])
        y_tr, y_pub = dev.labels[sp.train], dev.labels[sp.public]
        lean = int(prior[sp.public].mean(0).argmax())
        majority = int(np.bincount(y_pub, minlength=c).argmax())
        bias = fit_prior_bias(prior[sp.train])  # the board's calibration: its training priors, no label
        # --- the activation attacks: the same activations travel under every label defence
        t0 = time.perf_counter()
        shared = {
            "public_probe_true_prompt": float(np.mean(public_probe(
                tapped[sp.public], y_pub, tapped[sp.train], c, False, rng) == y_tr)),
            "public_probe_guessed_prompt": float(np.mean(public_probe(
                tapped_guess[sp.public], y_pub, tapped[sp.train], c, True, rng) == y_tr)),
            "text_match": text_match(tapped[sp.train, -1], tapped[:n, -1], sp.train, False),
            "text_match_guessed_prompt": text_match(tapped[sp.train, -1], tapped_guess[:n, -1], sp.train, True),
        }
        progress(f"split {s + 1}/{splits}: activation attacks ({time.perf_counter() - t0:.0f} s): "
                 + "  ".join(f"{k} {v:.3f}" for k, v in shared.items()))
        for name, params in chosen.items():
            eps = params["epsilon"]
            secret = DeviceSecret.generate(out_dim, rng)
            b = bias if params.get("calibrated", True) else None
            p_train, p_hold = calibrate(prior[sp.train], b), calibrate(prior[sp.holdout], b)
            if params.get("train_on") == "board":
                c0 = time.process_time()
                targets = secret.targets(y_tr, p_train, 0.0, rng)
                blob, _ = board_train(spec, hyper, tapped[sp.train], targets)
                board_cpu = time.process_time() - c0
                g_te = SideNetForward.from_bytes(spec, blob)(dev.states[sp.holdout])
                acc = float(np.mean((p_hold + secret.unmix(g_te, c)).argmax(1) == dev.labels[sp.holdout]))
                row = per[name]
                row["task_accuracy"].append(acc)
                row["device_cpu_s"].append(cpu_per_sample * train + board_cpu)
                row["keep"].append(1.0)
                for k in ATTACKS:
                    row["attacks"][k].append(None)  # nothing left the board
                progress(f"split {s + 1}/{splits}: {name}: task {acc:.3f}, board training {board_cpu:.1f} CPU-s, "
                         "nothing sent")
                continue
            c0 = time.process_time()
            z = randomize(y_tr, c, math.inf if eps is None else eps, rng)
            targets = secret.targets(z, p_train, noise_std, rng)
            board_cpu = time.process_time() - c0
            net, _ = server_train(spec, hyper, tapped[sp.train].astype(np.float32), targets)
            fwd = SideNetForward.from_bytes(spec, net.to_weights())
            g_te = fwd(dev.states[sp.holdout])
            acc = float(np.mean((p_hold + secret.unmix(g_te, c)).argmax(1) == dev.labels[sp.holdout]))
            # the server's model of the labels: its own network on the device's cached activations,
            # the classes named by a probe on its outputs for the public reviews
            w = fit_logistic(fwd(dev.states[sp.public]).astype(np.float64), y_pub, c, 1e-3)
            attacks: dict[str, float | None] = {
                **target_attacks(targets, y_tr, c, lean, majority),
                "model_output": float(np.mean(predict_logistic(w, fwd(dev.states[sp.train]).astype(np.float64))
                                              == y_tr)),
                **shared}
            row = per[name]
            row["task_accuracy"].append(acc)
            row["device_cpu_s"].append(cpu_per_sample * train + board_cpu)
            row["keep"].append(float(np.mean(z == y_tr)))
            for k, v in attacks.items():
                row["attacks"][k].append(v)
            progress(f"split {s + 1}/{splits}: {name} ({'ε=' + format(eps, 'g') if eps else 'no label-DP'}): "
                     f"task {acc:.3f}, kept labels {row['keep'][-1]:.3f}, "
                     + "  ".join(f"{k} {v:.3f}" for k, v in attacks.items() if k in LABEL_ATTACKS[:5]
                                 and v is not None))
    return {"params": chosen, "per_split": per, "chance": float(np.bincount(dev.labels, minlength=c).max() / n)}


def _mean(v: list[Any]) -> float | None:
    return None if not v or any(x is None for x in v) else round(statistics.fmean(v), 4)


def _std(v: list[Any]) -> float | None:
    return None if not v or any(x is None for x in v) else round(statistics.pstdev(v), 4)


def summarise(task: str, res: dict[str, Any], default: str = "label_dp") -> dict[str, Any]:
    """The results.json of issue 12: means over the splits."""
    out: dict[str, Any] = {"task": task, "chance": round(res["chance"], 4), "defences": {}, "default": default}
    for name, row in res["per_split"].items():
        out["defences"][name] = {
            "params": {k: v for k, v in res["params"][name].items() if v is not None},
            "task_accuracy": _mean(row["task_accuracy"]),
            "device_cpu_s": _mean(row["device_cpu_s"]),
            "attacks": {a: _mean(v) for a, v in row["attacks"].items()}}
    return out


# ------------------------------------------------------------------ report


def best_label_attack(d: dict[str, Any]) -> tuple[str, float] | None:
    got = [(a, v) for a, v in d["attacks"].items() if a in LABEL_ATTACKS and v is not None]
    return max(got, key=lambda t: t[1]) if got else None


def plot_svg(results: dict[str, Any], width: int = 560, height: int = 380) -> str:
    """Best label attack (y) against task accuracy (x), one point per defence: a plain SVG (no matplotlib)."""
    # a defence that leaves no attack anything to read (board_training) is drawn at chance
    pts = [(n if b is not None else f"{n} (nothing sent)", d["task_accuracy"], b[1] if b is not None else results["chance"])
           for n, d in results["defences"].items() if d["task_accuracy"] is not None
           for b in [best_label_attack(d)]]
    xs, ys = [p[1] for p in pts] or [0.5], [p[2] for p in pts] or [0.5]
    x0, x1 = min(xs) - 0.01, max(xs) + 0.01
    y0, y1 = min(min(ys), results["chance"]) - 0.02, 1.0
    m = 60

    def px(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (width - 2 * m)

    def py(y: float) -> float:
        return height - m - (y - y0) / (y1 - y0) * (height - 2 * m)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{m}" y1="{height - m}" x2="{width - m}" y2="{height - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{height - m}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 20}" text-anchor="middle">task accuracy (held out)</text>',
             f'<text x="16" y="{height / 2}" text-anchor="middle" transform="rotate(-90 16 {height / 2})">'
             'best label attack accuracy</text>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">{html.escape(results["task"])}: '
             'best attack on the labels vs task accuracy, per defence</text>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{px(xv):.1f}" y="{height - m + 14}" text-anchor="middle">{xv:.3f}</text>')
        parts.append(f'<text x="{m - 4}" y="{py(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
    cy = py(results["chance"])
    parts.append(f'<line x1="{m}" y1="{cy:.1f}" x2="{width - m}" y2="{cy:.1f}" stroke="gray" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{width - m}" y="{cy - 4:.1f}" text-anchor="end" fill="gray">chance</text>')
    for name, x, y in pts:
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="steelblue"/>')
        parts.append(f'<text x="{px(x) + 8:.1f}" y="{py(y) - 6:.1f}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def format_report(results: dict[str, Any], res: dict[str, Any], setup: dict[str, Any]) -> str:
    d = results["defences"]
    names = list(d)
    lines = [f"# sidetune bench privacy: {results['task']}", "",
             f"Setup: {setup['public']} public (server-labelled) / {setup['train']} device training / "
             f"{setup['holdout']} device held-out Rotten Tomatoes reviews, {setup['splits']} random splits "
             f"(means; ± is the std over splits), backbone {setup['backbone'][:16]}…, device prompt "
             f"`{setup['task']}`, guessed prompt `{setup['guessed']}`, {setup['epochs']} epochs, "
             f"K = {setup['out_dim']}, noise_std {setup['noise_std']}. Took {setup['seconds']:.0f} s. "
             f"Attack accuracies are against the device's true training labels; chance "
             f"(majority class) {results['chance']:.3f}. Default defence: `{results['default']}`.", "",
             "![best label attack against task accuracy](plot.svg)", "",
             "| | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]

    def cell(name: str, key: str, attack: bool) -> str:
        row = res["per_split"][name]
        v = row["attacks"][key] if attack else row[key]
        m_, s_ = _mean(v), _std(v)
        return "null" if m_ is None else f"{m_:.3f} ± {s_:.3f}" if key != "device_cpu_s" else f"{m_:.0f}"

    lines.append("| params | " + " | ".join(json.dumps(d[n]["params"]) for n in names) + " |")
    lines.append("| P(sent label = true), RR formula | " + " | ".join(
        f"{keep_probability(d[n]['params'].get('epsilon', math.inf), 2):.3f}" for n in names) + " |")
    lines.append("| **task accuracy** | " + " | ".join(cell(n, "task_accuracy", False) for n in names) + " |")
    lines.append("| device CPU s | " + " | ".join(cell(n, "device_cpu_s", False) for n in names) + " |")
    for a in ATTACKS:
        lines.append(f"| {a} | " + " | ".join(cell(n, a, True) for n in names) + " |")
    lines.append("| **best label attack** | " + " | ".join(
        "null" if (b := best_label_attack(d[n])) is None else f"{b[1]:.3f} ({b[0]})" for n in names) + " |")
    lines += ["", "`board_training` trains the side network on the board (`train_on = \"board\"`, numpy) on targets of "
              "the true labels: no target, activation or weight leaves the board, so no attack has anything to read "
              "(null); its device CPU adds the training to the forward passes. The plot draws it at chance.",
              f"`text_match` chance: 1 / {setup['candidates']} candidate texts.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ the command


def guessed_task_name(task: str) -> str:
    return "plain" if task == "chat" else "chat"


def run_privacy_bench(backbone_dir: Path, task_name: str, out_dir: Path, *, public: int, train: int, holdout: int,
                      splits: int, epochs: int, cache_dir: Path, progress: Progress = print) -> dict[str, Any]:
    from edge_agent.backbone import Backbone
    from edge_agent.features import FeatureExtractor
    from sidetune.bench.accuracy import builtin_task, extract_all
    from sidetune.data import load_reviews

    t_start = time.perf_counter()
    task = builtin_task(task_name)  # a bad task file fails before any work
    guess_name = guessed_task_name(task_name)
    guess = builtin_task(guess_name)
    if task.num_classes != 2 or guess.classes != task.classes:
        raise ValueError(f"the privacy bench runs on Rotten Tomatoes: the task's classes must be "
                         f"{list(guess.classes)}, not {list(task.classes)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = Backbone.load(backbone_dir, threads=2)
    reviews = load_reviews()
    total = public + train + holdout
    if total > len(reviews):
        raise ValueError(f"--public + --train + --holdout = {total} is more than the {len(reviews)} reviews there are")
    reviews = [reviews[i] for i in np.random.default_rng(0).permutation(len(reviews))[:total]]
    # the board's CPU per forward pass, measured here (features may come from the cache)
    fx = FeatureExtractor(backbone, task, max_length=MAX_LENGTH)
    probe = [r.text for r in reviews[: min(32, total)]]
    fx.extract(probe[:2])  # warm-up
    c0 = time.process_time()
    fx.extract(probe)
    cpu_per_sample = (time.process_time() - c0) / len(probe)
    progress(f"board CPU per forward pass: {cpu_per_sample * 1000:.0f} ms (process time, {len(probe)} reviews)")
    dev = extract_all(backbone, task, reviews, cache_dir, MAX_LENGTH, progress)
    guessed = extract_all(backbone, guess, reviews, cache_dir, MAX_LENGTH, progress)
    hyper = HyperParams(epochs=epochs)
    res = privacy_on_features(dev, guessed, public=public, train=train, holdout=holdout, splits=splits, hyper=hyper,
                              cpu_per_sample=cpu_per_sample, board_training=True, progress=progress)
    results = summarise(task_name, res)
    setup = {"backbone": backbone.fingerprint, "task": task_name, "guessed": guess_name, "public": public,
             "train": train, "holdout": holdout, "splits": splits, "epochs": epochs, "out_dim": OUT_DIM,
             "noise_std": NOISE_STD, "candidates": total, "cpu_per_forward_pass_s": cpu_per_sample,
             "seconds": time.perf_counter() - t_start}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "details.json").write_text(json.dumps({"setup": setup, **res}, indent=2) + "\n")
    (out_dir / "plot.svg").write_text(plot_svg(results))
    (out_dir / "report.md").write_text(format_report(results, res, setup))
    progress(f"wrote {out_dir}/results.json, report.md, plot.svg, details.json ({setup['seconds']:.0f} s)")
    return results
