"""Backbone benchmark: ONNX Runtime fp32 / int8 versus torch eager, same model, same inputs.

    run_bench(backbone_dir, json_path=None) -> dict

For each engine a fresh subprocess loads the model once and runs every
(batch, sequence) configuration on identical random token ids (warm-up, then
the median of a few runs): per-sample latency = batch time / batch size.
Memory comes from the kernel: VmRSS after loading, and VmHWM (peak resident
set) reset through /proc/self/clear_refs before each configuration, so each
configuration's peak is its own (ru_maxrss, cumulative, where that is not
possible). A GGUF source is first converted to a plain safetensors copy in
another subprocess, so torch's number is its inference memory, not the
de-quantization transient.

Command line: ``python -m sidetune.bench.backbone BACKBONE_DIR [--json out.json]``.

(Over 400 lines: the worker processes, their protocol and the table are one unit; the FLOP counting
and the GEMM peak live in sidetune/bench/flops.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from backbone_export.errors import ExportError
from schemas.fingerprint import data_file, graph_bytes, graph_fingerprint
from schemas.manifest import (
    ONNX_NAME,
    TOKENIZER_NAME,
    BackboneError,
    BackboneManifest,
    read_manifest,
)

BATCHES = (1, 8)
SEQS = (32, 64, 128)
ENGINES = ("onnx-fp32", "onnx-int8", "torch-eager")
_PKG_ROOT = str(Path(__file__).resolve().parents[2])


# -- measurement helpers (run inside the worker) ------------------------------


def _proc_status(field: str) -> float | None:
    """VmRSS / VmHWM of this process in MB (Linux), else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _rss_mb() -> float:
    v = _proc_status("VmRSS")
    return v if v is not None else _maxrss_mb()


def _inputs(manifest: BackboneManifest, batch: int, seq: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed + 1000 * batch + seq)
    vocab = manifest.vocab_size
    low = min(100, vocab // 2)  # skip the special tokens at the start of the vocabulary
    ids = rng.integers(low, vocab, size=(batch, seq), dtype=np.int64)
    prefix = list(manifest.prefix_ids)
    if prefix:
        ids[:, : len(prefix)] = prefix
    return ids


def _time(fn: Callable[[], Any], reps: int, budget: float) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each timed run (after one warm-up run)."""
    fn()  # warm-up
    times: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(times) < reps:
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if len(times) >= 2 and time.perf_counter() - start > budget:
            break
    return times, cpu


def _worker(engine: str, model_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: load once, measure every configuration."""
    import numpy as np

    from sidetune.bench.flops import forward_flops

    threads = int(cfg["threads"])
    manifest = read_manifest(cfg["manifest_dir"])
    shapes = cfg["shapes"]
    rss_start = _rss_mb()
    t0 = time.perf_counter()
    if engine.startswith("onnx"):
        sys.path.insert(0, _PKG_ROOT)
        from edge_agent.backbone import Backbone

        bb = Backbone.load(model_dir, threads=threads)

        def make_run(ids: np.ndarray) -> Callable[[], Any]:
            seqs = ids.tolist()
            return lambda: bb.run(seqs, batch_size=len(seqs))
    else:
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        torch.set_num_threads(threads)
        from backbone_export.load import CAUSAL
        from backbone_export.wrapper import PivotWrapper

        cls = AutoModelForCausalLM if manifest.kind == CAUSAL else AutoModel
        model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
        wrapper = PivotWrapper(model, manifest.kind or CAUSAL).eval()

        def make_run(ids: np.ndarray) -> Callable[[], Any]:
            x = torch.from_numpy(ids)
            mask = torch.ones_like(x)

            def run() -> Any:
                with torch.inference_mode():
                    return wrapper(x, mask)

            return run

    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    load_peak = _proc_status("VmHWM") or _maxrss_mb()
    rows = []
    configs = sorted(
        ((b, s) for b in cfg["batches"] for s in cfg["seqs"]), key=lambda bs: (bs[0] * bs[1], bs)
    )
    for b, s in configs:
        ids = _inputs(manifest, b, s)
        run = make_run(ids)
        rss_before = _rss_mb()
        exact = _reset_peak()
        times, cpu = _time(run, int(cfg["reps"]), float(cfg["budget"]))
        peak = _proc_status("VmHWM") if exact else None
        if peak is None:
            peak = _maxrss_mb()
        med = float(np.median(times))
        flops = forward_flops(shapes, [s] * b)
        rows.append(
            {
                "batch": b,
                "seq": s,
                "runs": len(times),
                "batch_ms": round(med * 1000, 2),
                "ms_per_sample": round(med * 1000 / b, 2),
                "best_ms_per_sample": round(min(times) * 1000 / b, 2),
                "samples_per_s": round(b / med, 2),
                "cpu_ms_per_sample": round(float(np.median(cpu)) * 1000 / b, 2),
                "gflops": round(flops / med / 1e9, 3),  # achieved, per wall second (all threads)
                "gflops_per_cpu_s": round(flops / max(float(np.median(cpu)), 1e-9) / 1e9, 3),
                "peak_rss_mb": round(peak, 1),
                "peak_over_loaded_mb": round(peak - rss_loaded, 1),
                "rss_before_mb": round(rss_before, 1),
                "peak_exact": exact,
            }
        )
    return {
        "engine": engine,
        "model_dir": model_dir,
        "threads": threads,
        "load_s": round(load_s, 2),
        "rss_start_mb": round(rss_start, 1),
        "rss_loaded_mb": round(rss_loaded, 1),
        "load_peak_mb": round(load_peak, 1),
        "configs": rows,
    }


# -- orchestration ------------------------------------------------------------


def _subprocess(args: list[str], threads: int, timeout: float) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PKG_ROOT, env.get("PYTHONPATH", "")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(
        [sys.executable, "-m", "sidetune.bench.backbone", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise ExportError(f"benchmark worker {args[:2]} failed:\n{tail}")
    return proc.stdout.strip().splitlines()[-1]


def _plain_torch_copy(manifest: BackboneManifest, dest: Path, threads: int) -> str:
    """A directory torch can load quickly: the source itself, or a safetensors copy of a GGUF."""
    if manifest.source_kind == "hf":
        for cand in (manifest.source_path, manifest.source):
            if cand and Path(cand, "config.json").is_file():
                return str(cand)
        raise ExportError(f"the torch model's source {manifest.source!r} is not available")
    spec = manifest.source
    path = manifest.source_path
    model = path if path and Path(path).is_file() else spec
    _subprocess(["--prepare", str(model), str(dest)], threads, timeout=900)
    return str(dest)


def _prepare(model: str, dest: str) -> None:
    """Worker: save a GGUF model as a plain fp32 safetensors directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from backbone_export.load import load_model
    from backbone_export.locate import locate_model

    loaded = load_model(locate_model(model), attn_implementation=None)
    cfg = loaded.model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.model.state_dict())
    plain.save_pretrained(dest)
    print(json.dumps({"ok": True}))


def _int8_copy(src_dir: Path, dest: Path) -> Path:
    from backbone_export.quantize import quantize_int8

    dest.mkdir(parents=True, exist_ok=True)
    data_file(dest / ONNX_NAME).unlink(missing_ok=True)  # the int8 graph is written as one file
    settings = quantize_int8(src_dir / ONNX_NAME, dest / ONNX_NAME)
    shutil.copy(src_dir / TOKENIZER_NAME, dest / TOKENIZER_NAME)
    m = read_manifest(src_dir).model_copy(update=dict(
        fingerprint=graph_fingerprint(dest / ONNX_NAME),
        quantization="int8",
        quantization_settings=settings,
        onnx_bytes=graph_bytes(dest / ONNX_NAME),
    ))
    m.write(dest)
    return dest


def format_table(result: dict[str, Any]) -> str:
    engines = [e for e in result["engines"] if "configs" in e]
    lines = []
    for e in result["engines"]:
        if "configs" in e:
            lines.append(
                f"{e['engine']:<12} load {e['load_s']:6.1f} s   RSS loaded {e['rss_loaded_mb']:7.0f} MB"
                f"   load peak {e['load_peak_mb']:7.0f} MB"
            )
        else:
            lines.append(f"{e['engine']:<12} skipped: {e.get('skipped')}")
    head = f"{'batch':>5} {'seq':>4} |" + "|".join(f" {e['engine']:^26} " for e in engines)
    sub = f"{'':>5} {'':>4} |" + "|".join(
        f" {'ms/sample':>10} {'peak MB':>8} {'x':>6} " for _ in engines
    )
    lines += ["", head, sub, "-" * len(sub)]
    ref = next((e for e in engines if e["engine"] == "torch-eager"), None)
    keys = [(c["batch"], c["seq"]) for c in engines[0]["configs"]] if engines else []
    for b, s in sorted(keys):
        cells = []
        base = None
        if ref is not None:
            base = next(c for c in ref["configs"] if (c["batch"], c["seq"]) == (b, s))
        for e in engines:
            c = next(c for c in e["configs"] if (c["batch"], c["seq"]) == (b, s))
            speed = f"{base['ms_per_sample'] / c['ms_per_sample']:6.2f}" if base else "     -"
            cells.append(f" {c['ms_per_sample']:>10.1f} {c['peak_rss_mb']:>8.0f} {speed} ")
        lines.append(f"{b:>5} {s:>4} |" + "|".join(cells))
    lines.append("")
    lines.append(
        "ms/sample: median wall time per batch / batch; peak MB: resident-set peak during that "
        "configuration (whole process, model included); x: speed-up over torch eager."
    )
    hw = result.get("hardware") or {}
    if hw.get("gemm_peak_gflops"):
        fp = next((e for e in engines if e["engine"] == "onnx-fp32"), None)
        lines.append(
            f"GEMM peak of ONNX Runtime on the backbone's weight shapes (512 tokens, {result['threads']} "
            f"threads, best run): fp32 {hw['gemm_peak_gflops']:.0f} GFLOP/s, int8 "
            f"{hw['gemm_peak_int8_gops']:.0f} GOP/s")
        if fp is not None:
            best = max(fp["configs"], key=lambda c: c["gflops"])
            lines.append(
                f"onnx-fp32 forward pass: {best['gflops']:.0f} GFLOP/s at batch {best['batch']} x "
                f"{best['seq']} ({100 * best['gflops'] / hw['gemm_peak_gflops']:.0f} % of the fp32 GEMM peak)")
        g = hw.get("gemm") or {}
        if g.get("fp32_per_cpu_s"):
            lines.append(f"per CPU-second (all threads; a busy machine does not distort it): GEMM fp32 "
                         f"{g['fp32_per_cpu_s']:.0f} GFLOP, int8 {g['int8_per_cpu_s']:.0f} GOP; the forward "
                         "passes' in the JSON (gflops_per_cpu_s)")
    if result.get("load_average_before") is not None:
        lines.append(
            f"load average before/after: {result['load_average_before']} / "
            f"{result['load_average_after']} on {result['cpu_count']} CPUs "
            "(other work on the machine inflates wall times; see cpu_ms_per_sample in the JSON)"
        )
    return "\n".join(lines)


def run_bench(
    backbone_dir: str | Path,
    json_path: str | Path | None = None,
    *,
    batches: Sequence[int] = BATCHES,
    seqs: Sequence[int] = SEQS,
    threads: int = 2,
    reps: int = 3,
    budget_s: float = 6.0,
    engines: Sequence[str] = ENGINES,
    gemm: bool = True,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Latency and peak memory per (batch, seq) for each engine; prints a table, returns a dict."""
    d = Path(backbone_dir)
    try:
        manifest = read_manifest(d)
    except BackboneError as e:
        raise ExportError(f"no readable backbone in {str(d)!r}: {e}") from e
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise ExportError(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    from sidetune.bench.flops import graph_shapes

    cfg = {
        "shapes": graph_shapes(d),
        "threads": threads,
        "batches": list(batches),
        "seqs": list(seqs),
        "reps": reps,
        "budget": budget_s,
        "manifest_dir": str(d.resolve()),
    }
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="sidetune-bench-") as tmp_name:
        tmp = Path(tmp_name)
        dirs: dict[str, str | None] = {}
        q = manifest.quantization
        dirs["onnx-fp32"] = str(d) if not q else None
        if q == "int8":
            dirs["onnx-int8"] = str(d)
        elif "onnx-int8" in engines:
            progress("quantizing a copy to int8 for the comparison ...")
            dirs["onnx-int8"] = str(_int8_copy(d, tmp / "int8"))
        for engine in engines:
            model_dir = dirs.get(engine)
            try:
                if engine == "torch-eager":
                    progress("preparing the torch model from the manifest's source ...")
                    model_dir = _plain_torch_copy(manifest, tmp / "torch", threads)
                if model_dir is None:
                    results.append({"engine": engine, "skipped": "no fp32 graph in an int8 folder"})
                    continue
                progress(f"benchmarking {engine} ({threads} threads) ...")
                line = _subprocess(
                    ["--worker", engine, model_dir, json.dumps(cfg)], threads, timeout=1800
                )
                results.append(json.loads(line))
            except (ExportError, subprocess.TimeoutExpired) as e:
                results.append({"engine": engine, "skipped": str(e).splitlines()[0]})
                progress(f"{engine}: skipped ({e})")
    hardware: dict[str, Any] = {}
    if gemm:
        progress(f"measuring ONNX Runtime's GEMM peak on the backbone's shapes ({threads} threads) ...")
        try:
            peak = json.loads(_subprocess(["--gemm", json.dumps(cfg)], threads, timeout=600))
            hardware = {"gemm_peak_gflops": peak["fp32"], "gemm_peak_int8_gops": peak["int8"], "gemm": peak}
        except (ExportError, subprocess.TimeoutExpired) as e:
            hardware = {"skipped": str(e).splitlines()[0]}
    result = {
        "backbone": str(d.resolve()),
        "model_type": manifest.model_type,
        "source": manifest.source,
        "fingerprint": manifest.fingerprint,
        "quantization": q,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": _loadavg(),
        "bench_seconds": round(time.perf_counter() - started, 1),
        "engines": results,
        "hardware": hardware,
    }
    progress(format_table(result))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        progress(f"wrote {json_path}")
    return result


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("backbone", type=Path, help="an exported backbone folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--worker"]:
        engine, model_dir, cfg = args[1], args[2], json.loads(args[3])
        print(json.dumps(_worker(engine, model_dir, cfg)), flush=True)
        return 0
    if args[:1] == ["--gemm"]:
        from sidetune.bench.flops import gemm_peak

        cfg = json.loads(args[1])
        print(json.dumps(gemm_peak(cfg["shapes"], threads=int(cfg["threads"]))), flush=True)
        return 0
    if args[:1] == ["--prepare"]:
        _prepare(args[1], args[2])
        return 0
    ns = add_bench_arguments(argparse.ArgumentParser(prog="sidetune.bench.backbone")).parse_args(args)
    try:
        run_bench(ns.backbone, json_path=ns.json, threads=ns.threads)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
