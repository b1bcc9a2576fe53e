"""The LoRA baselines of ``sidetune bench cohort`` (rows 6–8 of issue 20), each on the same shards.

* ``lora_alone`` — each board alone, on-device PEFT LoRA (r = 8, q/v: ``sidetune/bench/lora.py``'s
  ``lora_child``, one process per board): one epoch more while the shared held-out accuracy
  improves, at most ``alone_max_epochs``; on the first ``alone_boards`` boards when the budget
  says so (every board costs the same: the mean is over the boards run, and the report says how
  many).
* ``flower_fedavg_lora`` — federated LoRA with the real ``flwr`` package on its deployment engine,
  without Ray: one ``flower-superlink`` and one ``flower-supernode`` per board on loopback (its
  partition in ``--node-config``), the app ``sidetune/bench/flower-app`` submitted with
  ``flwr run APP bench`` (code: ``sidetune/bench/fedlora.py``). FedAvg over the LoRA adapters,
  ``flower_rounds`` rounds of ``flower_local_epochs`` local epochs on every board, at most two
  clients training at a time. Every board ends with the same global adapter: accuracy_mean =
  accuracy_min.
* ``central_lora`` — LoRA on the pooled shards, labels in the clear, on a server (no device cost:
  the device figures are None; the bytes up are the boards' texts and labels as UTF-8 JSON, the
  bytes down the adapter's safetensors).

Device figures, as ``bench compare`` measures LoRA (``getrusage`` CPU seconds, the kernel's VmHWM):
for ``lora_alone`` the board's process to the end of its best epoch's training (held-out scoring
taken out); for Flower, per board, the ClientApp processes Flower starts for each round (each
reports its own CPU seconds and VmHWM when its training is done) plus the board's SuperNode and
its SuperExec (read from /proc before they are stopped); peak RSS is the largest ClientApp's plus
the SuperNode's and SuperExec's (they run at once). ``time_to_adapter_s``: ``lora_alone`` the mean
board's wall time (start of its process to the end of its best epoch's training, scoring out);
Flower from ``flwr run`` to the last round's global adapter; central from its process's start to
its best epoch. Every process runs nice'd as the caller runs it, with 1 torch thread per board
process (two at a time on 2 cores) and 2 for the central one.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schemas.errors import UsageError
from sidetune.bench import flower_run
from sidetune.bench.measure import run_child
from sidetune.bench.shards import Shards

Progress = Callable[[str], None]
METHODS = ("lora_alone", "flower_fedavg_lora", "central_lora")
KEYS = (
    "accuracy_mean",
    "accuracy_min",
    "bytes_up_per_board",
    "bytes_down_per_board",
    "device_cpu_s_per_board",
    "device_peak_rss_mb",
    "time_to_adapter_s",
)
LORA = {"lr": 3e-4, "batch_size": 8}  # as bench compare's LoRA
#: What LoRA costs here (SmolLM2-135M, news prompts, 1 torch thread), measured by this module's run
#: on the news shards: CPU-s per training sample-epoch, per held-out sample scored, per process
#: start (imports and the model), and the wall seconds a Flower round adds (polling, start-ups).
COSTS = {"train": 0.74, "score": 0.24, "start": 7.0, "round_overhead_s": 30.0}


@dataclass(frozen=True)
class LoraBudget:
    """How much LoRA work each row does (the full bench has to stay under an hour)."""

    alone_boards: int | None = 2  # None: every board
    alone_max_epochs: int = 2
    flower_rounds: int = 1
    flower_local_epochs: int = 1
    central_max_epochs: int = 1
    concurrency: int = 2  # board processes training at once (2 cores)
    board_threads: int = 1
    central_threads: int = 2

    def estimate(self, boards: int, per_board: int, holdout: int) -> dict[str, dict[str, float]]:
        """Each row's CPU seconds and wall minutes on an idle 2-core machine, from COSTS (SmolLM2
        on the news task; every LoRA epoch scored, as lora_child scores it; the most epochs)."""
        c = COSTS
        n = boards if self.alone_boards is None else min(self.alone_boards, boards)
        e = self.alone_max_epochs
        board = c["start"] + e * (per_board * c["train"] + holdout * c["score"])
        fl_client = c["start"] + self.flower_local_epochs * per_board * c["train"]
        fl_score = c["start"] + (self.flower_rounds + 1) * holdout * c["score"]
        waves = -(-boards // self.concurrency)  # rounds of clients training two at a time
        fl_wall = self.flower_rounds * (waves * fl_client + c["round_overhead_s"]) + fl_score / 2
        central = c["start"] + self.central_max_epochs * (boards * per_board * c["train"] +
                                                          holdout * c["score"])
        return {
            "lora_alone": {"cpu_s": n * board, "wall_min": -(-n // self.concurrency) * board / 60},
            "flower_fedavg_lora": {
                "cpu_s": self.flower_rounds * boards * fl_client + fl_score + c["start"],
                "wall_min": (fl_wall + c["start"]) / 60,
            },
            "central_lora": {"cpu_s": central, "wall_min": central / 2 / 60},
        }


QUICK = LoraBudget(
    alone_boards=2, alone_max_epochs=1, flower_rounds=1, flower_local_epochs=1, central_max_epochs=1
)
FULL = LoraBudget()


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    """Token ids of every board's shard and of the held-out set, as .npz files lora_child reads."""

    boards: tuple[
        Path, ...
    ]  # per board: its shard as train_*, the shared held-out set as holdout_*
    pooled: Path
    model_dir: Path
    pad_id: int
    verbalizer_ids: tuple[int, ...]


def _flat(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    return np.fromiter(
        (t for s in seqs for t in s), dtype=np.int64, count=int(offsets[-1])
    ), offsets


def prepare_inputs(
    shards: Shards, backbone_dir: Path, task: Any, work: Path, cache_dir: Path, progress: Progress
) -> Inputs:
    """The boards' prompts tokenized as the board's ONNX forward pass tokenizes them."""
    from edge_agent.backbone import Backbone
    from edge_agent.features import FeatureExtractor
    from sidetune.bench.compare import torch_model_dir
    from sidetune.bench.features import MAX_LENGTH

    work.mkdir(parents=True, exist_ok=True)
    bb = Backbone.load(backbone_dir, threads=1, verify=False)
    fx = FeatureExtractor(bb, task, max_length=MAX_LENGTH)
    if fx.verbalizer_ids is None:
        raise UsageError(f"{backbone_dir} has no LM head: LoRA on the verbalizer logits needs one")

    def tokens(rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flat, offsets = _flat(fx.token_ids([r.text for r in rows]))
        return flat, offsets, np.array([task.label_index(r.label) for r in rows], dtype=np.int64)

    hf, ho, hy = tokens(shards.holdout)

    def save(path: Path, rows: Sequence[Any]) -> Path:
        f, o, y = tokens(rows)
        np.savez(
            path,
            train_flat=f,
            train_offsets=o,
            train_labels=y,
            holdout_flat=hf,
            holdout_offsets=ho,
            holdout_labels=hy,
        )
        return path

    boards = tuple(save(work / f"board-{b}.npz", rows) for b, rows in enumerate(shards.boards))
    pooled = save(work / "pooled.npz", shards.pooled())
    model_dir = torch_model_dir(backbone_dir, cache_dir, progress)
    return Inputs(
        boards, pooled, Path(model_dir), int(bb.pad_id), tuple(int(v) for v in fx.verbalizer_ids)
    )


# --------------------------------------------------------------------------- rows


def _lora_cfg(inputs: Inputs, npz: Path, threads: int, max_epochs: int) -> dict[str, Any]:
    return {
        "model_dir": str(inputs.model_dir),
        "inputs": str(npz),
        "pad_id": inputs.pad_id,
        "verbalizer_ids": list(inputs.verbalizer_ids),
        "threads": threads,
        "max_epochs": max_epochs,
        "seed": 0,
        **LORA,
    }


def _adapter_bytes(inputs: Inputs, work: Path) -> int:
    """Bytes of the LoRA adapter as safetensors (what a central server would send each board)."""
    res = run_child(
        "sidetune.bench.fedlora:adapter_size_child",
        {
            "model_dir": str(inputs.model_dir),
            "verbalizer_ids": list(inputs.verbalizer_ids),
            "pad_id": inputs.pad_id,
            "out": str(work / "adapter.safetensors"),
        },
        work,
        1,
        lambda _m: None,
    )
    return int(res["bytes"])


def lora_alone(
    inputs: Inputs, budget: LoraBudget, work: Path, progress: Progress
) -> tuple[dict, dict]:
    n = (
        len(inputs.boards)
        if budget.alone_boards is None
        else min(budget.alone_boards, len(inputs.boards))
    )
    progress(
        f"lora_alone: on-device LoRA on {n} of {len(inputs.boards)} boards, at most "
        f"{budget.alone_max_epochs} epochs, {budget.concurrency} at a time ..."
    )

    def one(b: int) -> dict[str, Any]:
        cfg = _lora_cfg(inputs, inputs.boards[b], budget.board_threads, budget.alone_max_epochs)

        def say(m: str) -> None:
            progress(f"lora_alone board {b}: {m}")

        return run_child("lora", cfg, work / f"alone-{b}", budget.board_threads, say)

    with ThreadPoolExecutor(max_workers=budget.concurrency) as pool:
        runs = list(pool.map(one, range(n)))
    best = [r["best"] for r in runs]
    acc = [b["accuracy"] for b in best]
    row = {
        "accuracy_mean": statistics.fmean(acc),
        "accuracy_min": min(acc),
        "bytes_up_per_board": 0.0,
        "bytes_down_per_board": 0.0,
        "device_cpu_s_per_board": statistics.fmean(b["device_cpu_s"] for b in best),
        "device_peak_rss_mb": max(b["device_peak_rss_mb"] for b in best),
        "time_to_adapter_s": statistics.fmean(b["job_wall_s"] for b in best),
    }
    details = {
        "boards_run": n,
        "boards": len(inputs.boards),
        "max_epochs": budget.alone_max_epochs,
        "per_board": [
            {"board": b, "best_epoch": r["best"]["epoch"], "epochs": r["epochs"]}
            for b, r in enumerate(runs)
        ],
    }
    return row, details


def central_lora(
    inputs: Inputs, shards: Shards, budget: LoraBudget, work: Path, progress: Progress
) -> tuple[dict, dict]:
    progress(
        f"central_lora: LoRA on the {len(shards.pooled())} pooled samples, at most "
        f"{budget.central_max_epochs} epochs ..."
    )
    cfg = _lora_cfg(inputs, inputs.pooled, budget.central_threads, budget.central_max_epochs)
    res = run_child(
        "lora",
        cfg,
        work / "central",
        budget.central_threads,
        lambda m: progress(f"central_lora: {m}"),
    )
    best = res["best"]
    up = [
        len(json.dumps([[r.text, r.label] for r in rows], ensure_ascii=False).encode())
        for rows in shards.boards
    ]
    down = _adapter_bytes(inputs, work / "central")
    row = {
        "accuracy_mean": best["accuracy"],
        "accuracy_min": best["accuracy"],
        "bytes_up_per_board": statistics.fmean(up),
        "bytes_down_per_board": float(down),
        "device_cpu_s_per_board": None,
        "device_peak_rss_mb": None,
        "time_to_adapter_s": best["job_wall_s"],
    }
    details = {
        "max_epochs": budget.central_max_epochs,
        "best_epoch": best["epoch"],
        "epochs": res["epochs"],
        "server_cpu_s": best["device_cpu_s"],
        "server_peak_rss_mb": best["device_peak_rss_mb"],
    }
    return row, details


def flower_fedavg_lora(
    inputs: Inputs, budget: LoraBudget, work: Path, progress: Progress
) -> tuple[dict, dict]:
    progress(
        f"flower_fedavg_lora: {len(inputs.boards)} Flower SuperNodes, {budget.flower_rounds} "
        f"rounds of {budget.flower_local_epochs} local epoch(s), at most {budget.concurrency} "
        "training at a time ..."
    )
    run_cfg = {
        "model-dir": str(inputs.model_dir),
        "verbalizer-ids": ",".join(map(str, inputs.verbalizer_ids)),
        "pad-id": inputs.pad_id,
        "boards": len(inputs.boards),
        "rounds": budget.flower_rounds,
        "local-epochs": budget.flower_local_epochs,
        "lr": LORA["lr"],
        "batch-size": LORA["batch_size"],
        "threads": budget.board_threads,
        "seed": 0,
    }
    fed = flower_run.run_federation(
        list(inputs.boards), run_cfg, work / "flower", budget.board_threads, progress
    )
    progress("flower_fedavg_lora: scoring each round's global adapter on the held-out set ...")
    scored = run_child(
        "sidetune.bench.fedlora:score_child",
        {
            "model_dir": str(inputs.model_dir),
            "verbalizer_ids": list(inputs.verbalizer_ids),
            "pad_id": inputs.pad_id,
            "inputs": str(inputs.boards[0]),
            "threads": 2,
            "adapters": [r["adapter"] for r in fed["rounds"]],
        },
        work / "flower",
        2,
        lambda m: progress(f"flower_fedavg_lora: {m}"),
    )
    acc = scored["accuracy"][-1]
    per_board = fed["per_board"]
    row = {
        "accuracy_mean": acc,
        "accuracy_min": acc,
        "bytes_up_per_board": statistics.fmean(b["bytes_up"] for b in per_board),
        "bytes_down_per_board": statistics.fmean(b["bytes_down"] for b in per_board),
        "device_cpu_s_per_board": statistics.fmean(b["device_cpu_s"] for b in per_board),
        "device_peak_rss_mb": max(b["device_peak_rss_mb"] for b in per_board),
        "time_to_adapter_s": fed["time_to_adapter_s"],
    }
    details = {
        "rounds": budget.flower_rounds,
        "local_epochs": budget.flower_local_epochs,
        "accuracy_per_round": dict(zip([r["round"] for r in fed["rounds"]], scored["accuracy"])),
        **{k: v for k, v in fed.items() if k != "rounds"},
    }
    return row, details


# --------------------------------------------------------------------------- all three


def run_baselines(
    shards: Shards,
    out_dir: Path,
    *,
    backbone_dir: Path,
    task: Any = "news",
    quick: bool = False,
    budget: LoraBudget | None = None,
    cache_dir: Path | None = None,
    methods: Sequence[str] = METHODS,
    progress: Progress = print,
) -> dict[str, dict[str, Any]]:
    """``{method: {KEYS...}}`` for ``methods`` on ``shards`` (its boards and its held-out set).

    ``task``: a TaskSpec or a name ``builtin_task`` knows (``news``); ``quick``: the QUICK budget
    (one epoch, one round, two boards alone) unless ``budget`` is given. Writes
    ``out_dir/baselines-<kind>.json`` (the rows, the budget, per-board and per-round details and the
    wall time of each row) and keeps each row's work in ``out_dir/work-<kind>``.
    """
    from sidetune.bench.features import builtin_task

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown baseline {unknown[0]!r}: the baselines are {', '.join(METHODS)}")
    budget = budget or (QUICK if quick else FULL)
    task = builtin_task(task) if isinstance(task, str) else task
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders, never a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f"work-{shards.kind}"
    cache = cache_dir or out_dir / "cache"
    t0 = time.perf_counter()
    inputs = prepare_inputs(shards, backbone_dir, task, work, cache, progress)
    rows: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {
        "shards": shards.summary(),
        "budget": asdict(budget),
        "prepare_s": time.perf_counter() - t0,
        "wall_s": {},
    }
    for m in methods:
        t = time.perf_counter()
        if m == "lora_alone":
            rows[m], details[m] = lora_alone(inputs, budget, work, progress)
        elif m == "flower_fedavg_lora":
            rows[m], details[m] = flower_fedavg_lora(inputs, budget, work, progress)
        else:
            rows[m], details[m] = central_lora(inputs, shards, budget, work, progress)
        details["wall_s"][m] = time.perf_counter() - t
        progress(
            f"{m} ({shards.kind}): "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[m].items()
            )
            + f" [{details['wall_s'][m] / 60:.1f} min]"
        )
        (out_dir / f"baselines-{shards.kind}.json").write_text(
            json.dumps({"methods": rows, "details": details}, indent=2, default=str) + "\n"
        )
    return rows
