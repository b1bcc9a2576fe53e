"""How close the board's forward pass comes to its hardware: the forward pass's FLOPs, and the peak of
a GEMM of the backbone's own shapes run by ONNX Runtime with the board's threads.

    shapes = graph_shapes(backbone_dir)                 # from the fp32 graph's MatMul weights
    flops = forward_flops(shapes, lengths)               # FLOPs of one forward pass per sequence
    peak = gemm_peak(shapes, threads=2)                  # {"fp32": GFLOP/s, "int8": GOP/s, ...}

FLOPs count the multiply-adds as two: every MatMul with a constant weight ``[K, N]`` (2·K·N per token),
attention's two products (2·T²·d per layer and sequence: Q·Kᵀ and softmax·V over all T positions, as
the exported eager attention computes them, masked or not) and the LM head at the pivot (2·V·d).
Norms, rotary and activations are left out (under 3 % of the fp32 graph's kernel time, profiled).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def graph_shapes(backbone_dir: str | Path) -> dict[str, Any]:
    """``{"matmuls": [[K, N], ...], "hidden": d, "vocab": V, "layers": L}`` of an export."""
    import onnx

    from schemas.manifest import read_manifest

    d = Path(backbone_dir)
    m = read_manifest(d)
    graph = onnx.load(str(d / m.onnx_file), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    mats = []
    for node in graph.node:  # a quantized graph's MatMuls count as the fp32 ones they replace
        if node.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul") and len(node.input) >= 2:
            if len(dims.get(node.input[1], [])) == 2:
                mats.append(dims[node.input[1]])
        elif node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            mats.append([attrs["K"], attrs["N"]])
    return {"matmuls": mats, "hidden": m.hidden_size, "vocab": m.vocab_size, "layers": m.num_layers,
            "has_logits": bool(m.has_logits)}


def forward_flops(shapes: dict[str, Any], lengths: Sequence[int]) -> float:
    """FLOPs of the forward passes of sequences of ``lengths`` tokens (each unpadded)."""
    t = np.asarray(lengths, dtype=np.float64)
    per_token = 2.0 * sum(k * n for k, n in shapes["matmuls"])
    attention = 4.0 * shapes["layers"] * shapes["hidden"] * t**2
    head = 2.0 * shapes["vocab"] * shapes["hidden"] if shapes["has_logits"] else 0.0
    return float(np.sum(per_token * t + attention + head))


def _matmul_session(k: int, n: int, threads: int, int8: bool) -> Any:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:  # what the int8 graph's MatMulIntegerToFloat does: uint8 activations x int8 weights
        w = numpy_helper.from_array(rng.integers(-64, 64, size=(k, n), dtype=np.int8), "w")
        node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
        x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["m", k])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])
    else:
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])
    model = helper.make_model(helper.make_graph([node], "gemm", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the board runs
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def gemm_peak(shapes: dict[str, Any], threads: int = 2, tokens: int = 512, seconds: float = 0.6
              ) -> dict[str, Any]:
    """GFLOP/s (int8: GOP/s) of ``[tokens, K] x [K, N]`` for each distinct weight shape of the
    backbone, fp32 and int8, best of repeated runs of about ``seconds`` each; ``fp32`` / ``int8``
    the best over the shapes (the runtime's peak on this CPU with these threads)."""
    rng = np.random.default_rng(1)
    per_shape: list[dict[str, Any]] = []
    for k, n in sorted({(int(k), int(n)) for k, n in shapes["matmuls"]}):
        row: dict[str, Any] = {"k": k, "n": n, "m": tokens}
        for kind in ("fp32", "int8"):
            sess = _matmul_session(k, n, threads, kind == "int8")
            x = (rng.integers(0, 255, size=(tokens, k), dtype=np.uint8) if kind == "int8"
                 else rng.standard_normal((tokens, k)).astype(np.float32))
            sess.run(None, {"x": x})  # warm-up (prepacking)
            best, runs, cpu0, start = float("inf"), 0, time.process_time(), time.perf_counter()
            while time.perf_counter() - start < seconds:
                t = time.perf_counter()
                sess.run(None, {"x": x})
                best = min(best, time.perf_counter() - t)
                runs += 1
            flop = 2.0 * tokens * k * n
            row[kind] = round(flop / best / 1e9, 3)
            # per CPU-second of this process (all its threads): what a busy machine does not distort
            row[f"{kind}_per_cpu_s"] = round(flop * runs / max(time.process_time() - cpu0, 1e-9) / 1e9, 3)
        per_shape.append(row)
    return {"threads": threads, "tokens": tokens, "per_shape": per_shape,
            "fp32": max(r["fp32"] for r in per_shape), "int8": max(r["int8"] for r in per_shape),
            "fp32_per_cpu_s": max(r["fp32_per_cpu_s"] for r in per_shape),
            "int8_per_cpu_s": max(r["int8_per_cpu_s"] for r in per_shape)}


def achieved(flops: float, wall_s: float, cpu_s: float | None = None) -> dict[str, float | None]:
    """GFLOP/s per wall second (the threads together) and per CPU second (one core's share)."""
    return {"gflops_per_wall_s": round(flops / wall_s / 1e9, 1) if wall_s > 0 else None,
            "gflops_per_cpu_s": round(flops / cpu_s / 1e9, 1) if cpu_s else None}


def gemm_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """``sidetune.bench.measure`` child: gemm_peak in a process of its own (``bench compare``)."""
    return gemm_peak(cfg["shapes"], threads=int(cfg["threads"]))
