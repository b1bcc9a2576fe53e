"""Which board graph: each quantized graph of one fp32 export against the fp32 graph, on the tasks of
``sidetune bench compare``, through the same pipeline (its forward child, its side networks).

    python -m sidetune.bench.graphs --backbone DIR --graph w8b32 --graph int8 [--task chat --task news]
        [--train N --holdout M] [--seeds 3] [--out bench-graphs]

For each task and graph: the board's forward passes over the training samples in a process of its own
(CPU seconds and peak RSS from inside it, as compare measures them; the held-out ones after the job,
cached by fingerprint), then the held-out accuracy of the side network an agent with default settings
trains on that graph's own activations (label-DP, calibrated prior, mixed targets, ``--seeds`` seeds;
``side_network_methods``), next to the same for fp32 on the same samples and seeds. Each graph is
quantized from the fp32 export into ``OUT/graphs/<graph>`` (weights beside the graph, as exported).
Prints the table; writes ``OUT/graphs.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from schemas.errors import SidetuneError, UsageError
from schemas.manifest import MANIFEST_NAME, ONNX_NAME, TOKENIZER_NAME, read_manifest

Progress = Any


def graph_copy(src_dir: Path, dest: Path, graph: str) -> Path:
    """``graph`` of the fp32 export in ``src_dir`` as an export folder ``dest`` (kept: made once)."""
    from backbone_export.onnx_export import externalize_weights
    from backbone_export.quantize import GRAPHS, calibration_sequences, quantize_graph
    from schemas.fingerprint import graph_bytes, graph_fingerprint

    m = read_manifest(src_dir)
    if m.quantization:
        raise UsageError(f"{src_dir} holds a {m.quantization} graph: give the fp32 export")
    if (dest / MANIFEST_NAME).exists():
        old = read_manifest(dest)
        if old.source_path == m.source_path and old.quantization_settings is not None and all(
                old.quantization_settings.get(k) == v for k, v in GRAPHS[graph].items()):
            return dest
    dest.mkdir(parents=True, exist_ok=True)
    single = dest / f".{graph}.onnx"
    calib = calibration_sequences(src_dir / TOKENIZER_NAME, list(m.prefix_ids), list(m.suffix_ids))
    settings = quantize_graph(src_dir / ONNX_NAME, single, graph, calibration=calib)
    externalize_weights(single, dest / ONNX_NAME)
    single.unlink()
    shutil.copy(src_dir / TOKENIZER_NAME, dest / TOKENIZER_NAME)
    read_manifest(src_dir).model_copy(update=dict(
        fingerprint=graph_fingerprint(dest / ONNX_NAME), quantization=graph,
        quantization_settings=settings, onnx_bytes=graph_bytes(dest / ONNX_NAME))).write(dest)
    return dest


def _forward(task: str, label: str, bdir: Path, tr_rows: list, ho_rows: list, work: Path,
             cache: Path, progress: Progress) -> dict[str, Any]:
    from sidetune.bench.compare import THREADS
    from sidetune.bench.measure import run_child

    cfg = {"label": label, "task": task, "backbone_dir": str(bdir), "threads": THREADS,
           "train": [[r.text, r.label] for r in tr_rows], "holdout": [[r.text, r.label] for r in ho_rows],
           "cache_dir": str(cache), "out": str(work / f"{label}.npz")}
    # A graph measured by an earlier run on the same samples is not run again (one graph per run
    # keeps each run short on a busy machine); its figures are that run's.
    key = {"fingerprint": read_manifest(bdir).fingerprint, "train": len(tr_rows), "holdout": len(ho_rows)}
    done = work / f"{label}.json"
    if done.exists() and (work / f"{label}.npz").exists():
        old = json.loads(done.read_text())
        if all(old.get("key", {}).get(k) == v for k, v in key.items()):
            progress(f"{task}: {label}: measured earlier ({done})")
            return old
    res = run_child("forward", cfg, work, THREADS, progress)
    res["key"] = key
    done.write_text(json.dumps(res) + "\n")
    progress(f"{task}: {label}: {len(tr_rows)} forward passes, job {res['device_cpu_s']:.1f} CPU-s, "
             f"{res['forward_wall_s']:.1f} s, peak {res['device_peak_rss_mb']:.0f} MB")
    return res


def run_graphs(backbone: Path, graphs: Sequence[str], tasks: Sequence[str], out: Path, *,
               train: int | None, holdout: int | None, seeds: int, progress: Progress = print) -> dict:
    from backbone_export.quantize import GRAPHS
    from sidetune.bench.compare import DEFAULT_SIZES, _features, side_network_methods, task_data

    bad = [g for g in graphs if g not in GRAPHS]
    if bad:
        raise UsageError(f"unknown graphs {bad}; choose from {', '.join(GRAPHS)}")
    import torch

    torch.set_num_threads(1)  # the side networks train as a worker trains them
    dirs = {"fp32": backbone}
    for g in graphs:
        t0 = time.perf_counter()
        dirs[g] = graph_copy(backbone, out / "graphs" / g, g)
        progress(f"graph {g}: {dirs[g]} ({time.perf_counter() - t0:.1f} s)")
    result: dict[str, Any] = {"backbone": str(backbone), "fingerprint": read_manifest(backbone).fingerprint,
                              "seeds": seeds, "tasks": []}
    for task in tasks:
        dataset, _spec, rows = task_data(task)
        n_tr, n_ho = DEFAULT_SIZES.get(dataset, DEFAULT_SIZES["rotten_tomatoes"])
        n_tr, n_ho = train or n_tr, holdout or n_ho
        pick = np.random.default_rng(0).permutation(len(rows))[: n_tr + n_ho]  # compare's split
        tr_rows, ho_rows = [rows[i] for i in pick[:n_tr]], [rows[i] for i in pick[n_tr:]]
        work = out / "work" / task.replace("/", "_")
        work.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {"task": task, "dataset": dataset, "train": n_tr, "holdout": n_ho, "graphs": {}}
        fwd = {g: _forward(task, g, d, tr_rows, ho_rows, work, out / "cache", progress) for g, d in dirs.items()}
        f32, tr, te, _ = _features(work / "fp32.npz")
        ref: list[float] | None = None  # fp32's accuracies: the same in every call (same seeds)
        for g in [*dirs][1:] + ["fp32"] if len(dirs) > 1 else ["fp32"]:
            if g == "fp32" and ref is not None:
                acc = {"sidetune": ref}
            else:
                fg = None if g == "fp32" else _features(work / f"{g}.npz")[0]
                acc, _, _ = side_network_methods(f32, fg, tr, te, seeds, lambda m: None)
                ref = acc["sidetune"]
            key = "sidetune" if g == "fp32" else "sidetune_int8"  # side_network_methods' name for the 2nd graph
            cpu = fwd[g]["device_cpu_s"]
            entry["graphs"][g] = {
                "accuracy": statistics.fmean(acc[key]), "accuracy_std": statistics.pstdev(acc[key]),
                "accuracies": acc[key], "fp32_accuracy_same_seeds": statistics.fmean(acc["sidetune"]),
                "device_cpu_s": cpu, "cpu_s_per_sample": cpu / n_tr, "forward_wall_s": fwd[g]["forward_wall_s"],
                "device_peak_rss_mb": fwd[g]["device_peak_rss_mb"], "fingerprint": fwd[g]["fingerprint"]}
            progress(f"{task}: {g}: accuracy {entry['graphs'][g]['accuracy']:.4f}, {cpu / n_tr:.3f} CPU-s/sample")
        entry["graphs"] = {g: entry["graphs"][g] for g in dirs}  # fp32 first
        result["tasks"].append(entry)
        (out / "graphs.json").write_text(json.dumps(result, indent=2) + "\n")
    progress(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    head = "| graph | " + " | ".join(f"{t['task']} CPU-s/sample | {t['task']} accuracy (Δ fp32)"
                                      for t in tasks) + " |"
    lines = [head, "|---|" + "---|---|" * len(tasks)]
    for g in tasks[0]["graphs"] if tasks else []:
        cells = []
        for t in tasks:
            e, ref = t["graphs"][g], t["graphs"]["fp32"]
            delta = "" if g == "fp32" else f" ({100 * (e['accuracy'] - ref['accuracy']):+.1f})"
            cells += [f"{e['cpu_s_per_sample']:.3f} ({e['cpu_s_per_sample'] / ref['cpu_s_per_sample']:.2f}×)",
                      f"{e['accuracy']:.3f} ± {e['accuracy_std']:.3f}{delta}"]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{t['task']} {t['train']} + {t['holdout']}" for t in tasks)
    lines.append(f"\n{sizes}; {result['seeds']} seeds; CPU-s of the training samples' forward passes "
                 "(the job, load included) / samples, 2 threads; Δ in accuracy points")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from backbone_export.quantize import GRAPHS

    p = argparse.ArgumentParser(prog="python -m sidetune.bench.graphs", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", type=Path, required=True, help="an exported fp32 backbone folder")
    p.add_argument("--graph", action="append", required=True, choices=list(GRAPHS), help="repeatable")
    p.add_argument("--task", action="append", default=None, help="as bench compare's; default chat and news")
    p.add_argument("--train", type=int, default=None, help="default: bench compare's sizes")
    p.add_argument("--holdout", type=int, default=None)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-graphs"))
    a = p.parse_args(argv)
    try:
        run_graphs(a.backbone, a.graph, a.task or ["chat", "news"], a.out, train=a.train, holdout=a.holdout,
                   seeds=a.seeds, progress=lambda m: print(f"[graphs] {m}", flush=True))
    except SidetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
