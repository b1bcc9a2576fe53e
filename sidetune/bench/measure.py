"""Each method of ``sidetune bench compare`` in its own process, so its CPU time and peak memory are its own.

The parent runs ``python -m sidetune.bench.measure KIND CONFIG.json``; the child does the work of KIND
and prints one JSON line last. What a device spends on a job is measured inside the child at the
moment the job's work is done (``resource.getrusage(RUSAGE_SELF)`` user + system seconds, and the
kernel's ``VmHWM``, the peak resident set so far), because a child may go on with work that is not
the device's job (forward passes of the held-out samples that only score it). The parent also keeps
the child's whole CPU time from ``wait4`` (not its ru_maxrss: on Linux that is at least the parent's
RSS at the fork).

Kinds: ``forward`` (the board's ONNX forward passes: sidetune/bench/compare.py) and ``lora``
(on-device LoRA in torch: sidetune/bench/lora.py).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.errors import SidetuneError

_ROOT = str(Path(__file__).resolve().parents[2])


class ChildFailed(SidetuneError):
    pass


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mb() -> float:
    """VmHWM (peak resident set) of this process in MB; ru_maxrss where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(kind: str, config: dict[str, Any], workdir: Path, threads: int,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run KIND in a fresh interpreter; its JSON result plus ``child_cpu_s`` (the whole child's CPU seconds)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"{kind}-{os.getpid()}-{len(list(workdir.iterdir()))}.json"
    cfg.write_text(json.dumps(config))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH", "")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch's OpenMP threads wait passively, as ONNX Runtime's do on the board (edge_agent/backbone.py):
    # spinning threads on a shared machine multiply LoRA's CPU seconds (one side-network training
    # measured 24 CPU-s spinning with 2 threads, 2.1 CPU-s passive), which would flatter sidetune.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.Popen([sys.executable, "-m", "sidetune.bench.measure", kind, str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    last = ""
    for line in proc.stdout:  # progress lines as they come; the result is the last line
        line = line.rstrip("\n")
        if line.startswith("{"):
            last = line
        elif line:
            progress(line)
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not last:
        tail = "; ".join(err.strip().splitlines()[-6:])
        raise ChildFailed(f"the {kind} process failed (exit {proc.returncode}): {tail}")
    out: dict[str, Any] = json.loads(last)
    out["child_cpu_s"] = ru.ru_utime + ru.ru_stime  # the whole child (not only the job)
    # (wait4's ru_maxrss is not the child's own peak: Linux keeps the parent's RSS at the fork if larger,
    # so the peak the results use is the child's VmHWM, taken inside it.)
    return out


def main(argv: list[str]) -> int:
    kind, cfg_path = argv[0], Path(argv[1])
    config = json.loads(cfg_path.read_text())
    if kind == "forward":
        from sidetune.bench.compare import forward_child

        result = forward_child(config)
    elif kind == "lora":
        from sidetune.bench.lora import lora_child

        result = lora_child(config)
    elif kind.startswith("sidetune.bench.") and ":" in kind:  # MODULE:FUNCTION (bench cohort's children)
        import importlib

        module, func = kind.split(":", 1)
        result = getattr(importlib.import_module(module), func)(config)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
