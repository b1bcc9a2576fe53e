"""``sidetune bench cohort``: fleet learning against what a fleet operator would run instead.

(Over 400 lines: the side-network rows and the bench's driver live together; the rows move to a
module of their own when the benches move out of the product's command package.)

The news task (seven outlets) split over N boards (default 8 × 250) two ways, IID and label-skewed
(Dirichlet α = 0.5; sidetune/bench/shards.py), every board scored on one held-out set (default
400). Rows (``METHODS``):

* ``alone`` — each board alone on the product's default path (label-DP at the agent's ε = 2, the
  calibrated prior, mixed targets, the server's trainer, the board's numpy prediction);
* ``cohort`` — the pooled cohort for real: N agents and a worker over a real mosquitto and Redis
  (sidetune/bench/cohort_round.py), each board scored with the adapter it installed;
* ``cohort_federated`` — members train on the board from clean labels and the server averages
  their changes (FedAvg, equal shares), ``FED_ROUNDS`` rounds, with the product's own functions
  (``schemas.sidenet.train``, ``side_server.federated.average``); ``cohort_federated_dp`` the same
  with user-level DP (clipping and Gaussian noise, its ε in the details);
* ``cohort_personal`` — the federated cohort's adapter, then a few epochs on each board's own
  clean labels (a personal layer);
* ``cohort_clear`` — the pooled side network with the labels in the clear (the cost of privacy);
* ``lora_alone``, ``flower_fedavg_lora``, ``central_lora`` — sidetune/bench/flower_lora.py.

Every method reports ``KEYS``. Device CPU and memory are measured in processes of their own
(the boards' forward passes, the agents of the real round, LoRA and Flower's clients); bytes
come from real encoded messages. Writes ``DIR/results.json``, ``DIR/report.md`` and a plot.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import EdgeSettings
from schemas.errors import UsageError
from sidetune.bench.features import NOISE_STD, TaskFeatures
from sidetune.bench.measure import cpu_seconds, peak_rss_mb, run_child
from sidetune.bench.shards import Shards
from sidetune.data import Review

Progress = Callable[[str], None]

METHODS = ("alone", "cohort", "cohort_personal", "cohort_federated", "cohort_clear", "lora_alone",
           "flower_fedavg_lora", "central_lora")
KEYS = ("accuracy_mean", "accuracy_min", "bytes_up_per_board", "bytes_down_per_board", "device_cpu_s_per_board",
        "device_peak_rss_mb", "time_to_adapter_s")
THREADS = 2
#: Federated rounds of the side network (each: local training on every board, one average): the
#: agent's default, and how the accuracy goes on to ``FED_CURVE`` rounds (the details' ``by_round``).
FED_ROUNDS = int(EdgeSettings.model_fields["federated_rounds"].default)
FED_CURVE = 6
#: Epochs of each board's local training per federated round, and of the personal layer.
FED_EPOCHS, PERSONAL_EPOCHS = 10, 5
#: User-level DP of the federated variant: clip norm and noise multiplier.
DP_CLIP, DP_NOISE = 1.0, 1.0


# --------------------------------------------------------------------------- the boards' forward passes


def forward_rows_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Child process: the board's forward passes over every distinct training row of the run (the
    boards' shards of every kind draw on the same rows: each is computed once), then the held-out
    set's. Both cached, so a second run costs nothing; the CPU seconds per training row are taken
    when they are computed and kept beside the cache (a cached run reports that figure)."""
    import hashlib

    from edge_agent.backbone import Backbone
    from sidetune.bench.features import builtin_task, extract_all

    task = builtin_task(cfg["task"])
    bb = Backbone.load(cfg["backbone_dir"], threads=int(cfg["threads"]))
    cache = Path(cfg["cache_dir"])
    rows = [Review(t, y) for t, y in cfg["rows"]]
    key = hashlib.sha256((bb.fingerprint + "\0".join(r.text for r in rows)).encode()).hexdigest()[:16]
    cost = cache / f"rows-cpu-{key}.json"
    computed = not cost.exists()
    c0 = cpu_seconds()
    f = extract_all(bb, task, rows, cache, 128, _tagged(print, "boards' rows"))
    if computed:  # the forward passes ran now: their CPU is the board's (a cached run reads it back)
        cache.mkdir(parents=True, exist_ok=True)
        cost.write_text(json.dumps({"cpu_s_per_row": (cpu_seconds() - c0) / max(len(rows), 1),
                                    "peak_rss_mb": peak_rss_mb()}))
    ho = extract_all(bb, task, [Review(t, y) for t, y in cfg["holdout"]], cache, 128, _tagged(print, "held-out"))
    np.savez(cfg["out"], states=f.states, prior=f.prior, labels=f.labels, holdout_states=ho.states,
             holdout_prior=ho.prior, holdout_labels=ho.labels)
    return json.loads(cost.read_text())


@dataclass
class Boards:
    """The boards' features: training rows board after board, and the shared held-out set."""

    f: TaskFeatures  # training rows of every board
    sizes: list[int]
    ho: TaskFeatures
    board_cpu_s: list[float]
    peak_rss_mb: float

    def rows(self, b: int) -> np.ndarray:
        start = sum(self.sizes[:b])
        return np.arange(start, start + self.sizes[b])


def board_features(shards: dict[str, Shards], backbone_dir: Path, work: Path, cache: Path,
                   progress: Progress) -> dict[str, Boards]:
    """Each kind's boards, from one child's forward passes over the distinct rows of all of them.
    A board's CPU seconds: the measured seconds per row × its rows (the board's own forward passes)."""
    distinct: dict[tuple[str, str], int] = {}
    for sh in shards.values():
        for rows in sh.boards:
            for r in rows:
                distinct.setdefault((r.text, r.label), len(distinct))
    holdout = next(iter(shards.values())).holdout
    out = work / "rows.npz"
    res = run_child("sidetune.bench.cohort:forward_rows_child", {
        "task": "news", "backbone_dir": str(backbone_dir), "threads": THREADS, "cache_dir": str(cache),
        "rows": list(distinct), "holdout": [(r.text, r.label) for r in holdout], "out": str(out)},
        work, THREADS, progress)
    with np.load(out, allow_pickle=False) as z:
        states, prior, labels = z["states"], z["prior"], z["labels"]
        ho = TaskFeatures(z["holdout_states"], z["holdout_prior"], z["holdout_labels"])
    per_row = float(res["cpu_s_per_row"])
    got = {}
    for kind, sh in shards.items():
        idx = np.array([distinct[(r.text, r.label)] for rows in sh.boards for r in rows])
        got[kind] = Boards(TaskFeatures(states[idx], prior[idx], labels[idx]), [len(b) for b in sh.boards], ho,
                           [per_row * len(b) for b in sh.boards], float(res["peak_rss_mb"]))
    return got


# --------------------------------------------------------------------------- the side-network rows


def _spec(f: TaskFeatures) -> Any:
    from sidetune.bench.compare import side_spec

    return side_spec(f)


def _tapped(spec: Any, states: np.ndarray) -> np.ndarray:
    return states[:, list(spec.taps)].astype(np.float32)


def side_rows(boards: Boards, *, epochs: int, seed: int, progress: Progress) -> dict[str, dict[str, Any]]:
    """``alone``, ``cohort_clear``, ``cohort_federated`` (+ ``_dp``) and ``cohort_personal`` from the
    boards' features, with the product's own functions. Accuracies per board on the held-out set."""
    from edge_agent.calibration import calibrate, fit_prior_bias
    from edge_agent.config import EdgeSettings
    from edge_agent.label_dp import randomize
    from edge_agent.secret import DeviceSecret
    from schemas import sidenet
    from schemas.spec import HyperParams
    from schemas.weights import decode_weights, encode_weights
    from side_server.federated import average, epsilon
    from side_server.trainer import train as server_train

    f, ho = boards.f, boards.ho
    c = f.prior.shape[1]
    spec = _spec(f)
    clear_spec = spec.model_copy(update={"out_dim": c})
    eps = float(EdgeSettings.model_fields["label_epsilon"].default)
    hyper = HyperParams(epochs=epochs, seed=seed)
    n_boards = len(boards.sizes)
    ho_tapped = ho.states  # the board's forward pass selects its taps

    # each board's calibrated prior (fitted on its own training priors, no label) and its secret
    bias = [fit_prior_bias(f.prior[boards.rows(b)]) for b in range(n_boards)]
    p_tr = [calibrate(f.prior[boards.rows(b)], bias[b]) for b in range(n_boards)]
    p_ho = [calibrate(ho.prior, bias[b]) for b in range(n_boards)]
    y = [f.labels[boards.rows(b)] for b in range(n_boards)]

    def acc(b: int, g: np.ndarray, mix: np.ndarray | None) -> float:
        corr = g if mix is None else g @ mix[:, :c]
        return float(np.mean((p_ho[b] + corr).argmax(1) == ho.labels))

    rows: dict[str, dict[str, Any]] = {}
    # alone: each board's own secret, its randomised labels, the server's trainer
    accs, train_s = [], []
    for b in range(n_boards):
        rng = np.random.default_rng([29, seed, b])
        secret = DeviceSecret.generate(spec.out_dim, rng)
        z = randomize(y[b], c, eps, rng)
        t = secret.targets(z, p_tr[b], NOISE_STD, rng)
        t0 = time.perf_counter()
        net, _ = server_train(spec, hyper, _tapped(spec, f.states[boards.rows(b)]), t)
        train_s.append(time.perf_counter() - t0)
        g = sidenet.SideNetForward.from_bytes(spec, net.to_weights())(ho_tapped)
        accs.append(acc(b, g, secret.basis))
    rows["alone"] = {"accuracies": accs, "board_train_cpu_s": 0.0, "server_train_s": sum(train_s)}
    progress(f"alone (ε = {eps:g}): mean {np.mean(accs):.3f}, worst {min(accs):.3f}")

    # cohort_clear: one network on every board's samples, true labels, no mixing, equal shares
    from side_server.cohorts import member_weights

    x_all = _tapped(spec, f.states)
    clear_t = np.concatenate([(np.eye(c)[y[b]] - p_tr[b]) for b in range(n_boards)]).astype(np.float32)
    net, _ = server_train(clear_spec, hyper, x_all, clear_t, sample_weight=member_weights(boards.sizes, 0.0))
    g = sidenet.SideNetForward.from_bytes(clear_spec, net.to_weights())(ho_tapped)
    accs = [acc(b, g, None) for b in range(n_boards)]
    rows["cohort_clear"] = {"accuracies": accs, "board_train_cpu_s": 0.0}
    progress(f"cohort_clear: mean {np.mean(accs):.3f}, worst {min(accs):.3f}")

    # federated: the cohort's basis, every board trains from the current average on its clean labels
    cohort = DeviceSecret.generate(spec.out_dim, np.random.default_rng([31, seed]))
    local = hyper.model_copy(update={"epochs": FED_EPOCHS})
    targets = [cohort.targets(y[b], p_tr[b], 0.0, np.random.default_rng(0)) for b in range(n_boards)]
    tapped = [_tapped(spec, f.states[boards.rows(b)]) for b in range(n_boards)]

    by_round: list[tuple[float, float]] = []  # (mean, worst) after each round, on to FED_CURVE

    def federated(clip: float, noise: float, rounds: int = FED_ROUNDS,
                  curve: bool = False) -> tuple[dict[str, np.ndarray], list[float], int, int]:
        w = sidenet.init_weights(spec, seed)
        cpu = [0.0] * n_boards
        up = down = 0
        rng = np.random.default_rng([37, seed])
        for r in range(max(rounds, FED_CURVE if curve else rounds)):
            if r == rounds:  # the row's figures are the agent's rounds; the curve goes on
                kept = ({k: v.copy() for k, v in w.items()}, list(cpu), up, down)
            deltas = []
            for b in range(n_boards):
                c0 = cpu_seconds()
                blob, _ = sidenet.train(spec, local, tapped[b], targets[b], init=encode_weights(w, spec))
                cpu[b] += cpu_seconds() - c0
                trained = decode_weights(blob, spec)
                deltas.append({k: trained[k] - w[k] for k in w})
            up += _update_bytes(spec, deltas[0])
            w = average(w, deltas, boards.sizes, max_share=0.0, clip=clip, noise_multiplier=noise, rng=rng)
            down += _adapter_bytes(spec, w)
            if curve:
                a = [acc(b, sidenet.SideNetForward(spec, w)(ho_tapped), cohort.basis) for b in range(n_boards)]
                by_round.append((float(np.mean(a)), float(min(a))))
                progress(f"cohort_federated: round {r + 1}: mean {by_round[-1][0]:.3f}, worst {by_round[-1][1]:.3f}")
        if max(rounds, FED_CURVE if curve else rounds) > rounds:
            return kept
        return w, cpu, up, down

    w, cpu, up, down = federated(0.0, 0.0, curve=True)
    g = sidenet.SideNetForward(spec, w)(ho_tapped)
    accs = [acc(b, g, cohort.basis) for b in range(n_boards)]
    rows["cohort_federated"] = {"accuracies": accs, "board_train_cpu_s": float(np.mean(cpu)), "bytes_up": up,
                                "bytes_down": down, "rounds": FED_ROUNDS, "local_epochs": FED_EPOCHS,
                                "by_round": by_round}
    progress(f"cohort_federated ({FED_ROUNDS} rounds): mean {np.mean(accs):.3f}, worst {min(accs):.3f}, "
             f"board training {np.mean(cpu):.1f} CPU-s per board")

    # personal layer: from the federated adapter, a few epochs on the board's own clean labels
    personal = hyper.model_copy(update={"epochs": PERSONAL_EPOCHS})
    accs, pcpu = [], []
    for b in range(n_boards):
        c0 = cpu_seconds()
        blob, _ = sidenet.train(spec, personal, tapped[b], targets[b], init=encode_weights(w, spec))
        pcpu.append(cpu_seconds() - c0)
        accs.append(acc(b, sidenet.SideNetForward.from_bytes(spec, blob)(ho_tapped), cohort.basis))
    rows["cohort_personal"] = {"accuracies": accs, "board_train_cpu_s": float(np.mean(cpu) + np.mean(pcpu)),
                               "bytes_up": up, "bytes_down": down}
    progress(f"cohort_personal: mean {np.mean(accs):.3f}, worst {min(accs):.3f}")

    # pooled on the server (the `cohort` row's training, offline): every board's ε = 2 targets in the
    # cohort's basis, equal shares, clipped targets; then board 0 hostile (targets pushed to the wrong
    # class, 10× too large): the other boards' accuracy with and without it
    from side_server.pooling import clip_targets

    weights = member_weights(boards.sizes, 0.0)
    rng = np.random.default_rng([41, seed])
    dp_t = [cohort.targets(randomize(y[b], c, eps, rng), p_tr[b], NOISE_STD, rng) for b in range(n_boards)]
    hostile = -10.0 * dp_t[0]
    for name, first in (("pooled_offline", dp_t[0]), ("pooled_hostile_member", hostile)):
        t_all = clip_targets(np.concatenate([first, *dp_t[1:]]))
        net, _ = server_train(spec, hyper, x_all, t_all, sample_weight=weights)
        g = sidenet.SideNetForward.from_bytes(spec, net.to_weights())(ho_tapped)
        accs = [acc(b, g, cohort.basis) for b in range(n_boards)]
        rows[name] = {"accuracies": accs, "others_mean": float(np.mean(accs[1:]))}
        progress(f"{name}: the other boards' mean {np.mean(accs[1:]):.3f}")

    w_dp, cpu_dp, up, down = federated(DP_CLIP, DP_NOISE)
    g = sidenet.SideNetForward(spec, w_dp)(ho_tapped)
    accs = [acc(b, g, cohort.basis) for b in range(n_boards)]
    rows["cohort_federated_dp"] = {"accuracies": accs, "board_train_cpu_s": float(np.mean(cpu_dp)), "bytes_up": up,
                                   "bytes_down": down, "clip": DP_CLIP, "noise_multiplier": DP_NOISE,
                                   "user_dp_epsilon": epsilon(DP_NOISE, FED_ROUNDS)}
    progress(f"cohort_federated_dp (clip {DP_CLIP}, σ {DP_NOISE}, ε {epsilon(DP_NOISE, FED_ROUNDS):.1f}): "
             f"mean {np.mean(accs):.3f}, worst {min(accs):.3f}")
    return rows


def _update_bytes(spec: Any, delta: dict[str, np.ndarray]) -> int:
    """One board's update as it travels (a real encoded WeightUpdate)."""
    from schemas.updates import WeightUpdate
    from schemas.weights import encode_weights
    from schemas.wire import encode

    u = WeightUpdate(device_id="board-0", job_id="fed-r1-00000000", cohort="bench", backbone_fingerprint="0" * 64,
                     spec=spec, base_version=1, samples=1, delta=encode_weights(delta, spec))
    return len(encode(u)[1])


def _adapter_bytes(spec: Any, w: dict[str, np.ndarray]) -> int:
    from schemas.adapter import AdapterUpdate
    from schemas.weights import encode_weights
    from schemas.wire import encode

    a = AdapterUpdate(device_id="board-0", job_id="cohort-v1", version=1, backbone_fingerprint="0" * 64, spec=spec,
                      weights=encode_weights(w, spec), metrics={"cohort_members": 8.0, "samples": 2000.0})
    return len(encode(a)[1])


def summarise(row: dict[str, Any], *, forward_cpu: float, peak_rss: float, bytes_up: float, bytes_down: float,
              time_to_adapter: float | None) -> dict[str, Any]:
    accs = row["accuracies"]
    return {"accuracy_mean": float(statistics.fmean(accs)), "accuracy_min": float(min(accs)),
            "bytes_up_per_board": float(row.get("bytes_up", bytes_up)),
            "bytes_down_per_board": float(row.get("bytes_down", bytes_down)),
            "device_cpu_s_per_board": forward_cpu + float(row.get("board_train_cpu_s", 0.0)),
            "device_peak_rss_mb": peak_rss, "time_to_adapter_s": time_to_adapter}


def check_sizes(boards: int, per_board: int, holdout: int) -> None:
    if boards < 2:
        raise UsageError(f"--boards {boards}: a cohort needs at least 2 boards")
    if per_board < 10 or holdout < 10:
        raise UsageError("--per-board and --holdout must be at least 10")


def methods_of(rows: Sequence[str]) -> list[str]:
    return [m for m in METHODS if m in rows]


# --------------------------------------------------------------------------- the whole bench


def run_cohort(backbone_dir: Path, out_dir: Path, *, boards: int, per_board: int, holdout: int, alpha: float,
               kinds: Sequence[str], epochs: int, quick: bool, live: bool, baselines: bool,
               cache_dir: Path, progress: Progress) -> dict[str, Any]:
    """Every row on every kind of shards; writes results.json, report.md and the plot."""
    from sidetune.bench.cohort_report import write_report
    from sidetune.bench.cohort_round import cohort_round
    from sidetune.bench.features import builtin_task
    from sidetune.bench.flower_lora import run_baselines
    from sidetune.bench.shards import news_shards

    check_sizes(boards, per_board, holdout)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    task = builtin_task("news")
    shards = news_shards(boards=boards, per_board=per_board, holdout=holdout, alpha=alpha)
    results: dict[str, Any] = {"shards": {}, "setup": {
        "task": "news", "boards": boards, "per_board": per_board, "holdout": holdout, "alpha": alpha,
        "epochs": epochs, "federated_rounds": FED_ROUNDS, "federated_local_epochs": FED_EPOCHS,
        "personal_epochs": PERSONAL_EPOCHS, "quick": quick, "backbone": str(backbone_dir)}}
    progress(f"forward passes of the boards' rows ({boards} boards × {per_board} per kind) and {holdout} held out")
    all_feats = board_features({k: shards[k] for k in kinds}, backbone_dir, out_dir / "work", cache_dir, progress)
    for kind in kinds:
        sh = shards[kind]
        work = out_dir / f"work-{kind}"
        t0 = time.perf_counter()
        feats = all_feats[kind]
        spec = _spec(feats.f)
        rows = side_rows(feats, epochs=epochs, seed=0, progress=_tagged(progress, kind))
        fwd = float(statistics.fmean(feats.board_cpu_s))
        real = None
        if live:
            real = cohort_round(backbone_dir, task, [list(b) for b in sh.boards], feats.ho, spec, work / "round",
                                pool="activations", epochs=epochs, progress=_tagged(progress, kind))
        up = statistics.fmean(b["bytes_up"] for b in real["boards"].values()) if real else None
        methods: dict[str, Any] = {}
        lone_down = _lone_adapter_bytes(spec)
        methods["alone"] = summarise(rows["alone"], forward_cpu=fwd, peak_rss=feats.peak_rss_mb,
                                     bytes_up=up or float("nan"), bytes_down=lone_down, time_to_adapter=None)
        if real:
            b = list(real["boards"].values())
            methods["cohort"] = {
                "accuracy_mean": float(statistics.fmean(x["accuracy"] for x in b)),
                "accuracy_min": float(min(x["accuracy"] for x in b)),
                "bytes_up_per_board": float(statistics.fmean(x["bytes_up"] for x in b)),
                "bytes_down_per_board": float(statistics.fmean(x["bytes_down"] for x in b)),
                "device_cpu_s_per_board": float(statistics.fmean(x["cpu_s"] for x in b)),
                "device_peak_rss_mb": float(max(x["peak_rss_mb"] or 0.0 for x in b)),
                "time_to_adapter_s": float(statistics.fmean(x["time_to_adapter_s"] for x in b)),
            }
        for m in ("cohort_federated", "cohort_personal", "cohort_clear", "cohort_federated_dp"):
            methods[m] = summarise(rows[m], forward_cpu=fwd, peak_rss=feats.peak_rss_mb,
                                   bytes_up=up or float("nan"), bytes_down=lone_down, time_to_adapter=None)
        if baselines:
            methods.update(run_baselines(sh, out_dir, backbone_dir=backbone_dir, task=task, quick=quick,
                                         cache_dir=cache_dir, progress=_tagged(progress, kind)))
        results["shards"][kind] = {"methods": methods, "shards": sh.summary(),
                                   "details": {"side_rows": rows, "real_round": real,
                                               "board_forward_cpu_s": feats.board_cpu_s,
                                               "seconds": time.perf_counter() - t0}}
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=_json) + "\n")
    results["seconds"] = time.perf_counter() - t_all
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=_json) + "\n")
    write_report(results, out_dir)
    return results


def _tagged(progress: Progress, tag: str) -> Progress:
    def say(m: str) -> None:
        progress(f"{tag}: {m}")

    return say


def _lone_adapter_bytes(spec: Any) -> float:
    from schemas import sidenet

    return float(_adapter_bytes(spec, sidenet.init_weights(spec, 0)))


def _json(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
