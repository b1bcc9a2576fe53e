"""Dynamic int8 quantization of an exported graph (ONNX Runtime)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import ExportError

QUANT_CHOICES = ("int8",)
# Per-channel weights: on SmolLM2-135M (240 Rotten Tomatoes prompts) the last
# layer's pivot state keeps cosine 0.92 to fp32 (per-tensor: 0.89) and the
# zero-shot prior 0.68 accuracy (per-tensor: 0.58, fp32: 0.76); same size.
#
# reduce_range: weights in 7 bits ([-64, 64]). ONNX Runtime's x86 u8s8 kernel
# on a CPU without VNNI (AVX2 only) adds pairs of uint8 x int8 products in
# saturating int16: with full-range weights a pair can reach 2*255*127 > 32767
# and the sum is silently clipped, so the same graph gives different numbers
# on different CPUs. With 7-bit weights a pair is at most 2*255*64 = 32640 and
# every kernel computes the exact integer result. Measured on an AVX2-only
# EPYC (6 review prompts, last layer vs torch): SmolLM2-135M 8-bit weights
# cosine -0.08 (exact u8u8 kernel: 0.895), 7-bit 0.895 with either kernel; the
# tiny test llama 0.81 -> 0.991 (seeds 0-19: 0.41-0.96 -> 0.984-0.997).
#
# Outlier-sensitive MatMuls stay in fp32: the MLP's down projections (weight [intermediate, hidden],
# wider in than out) read the gated activation product, whose rare huge values make a per-tensor
# dynamic activation scale crush everything else. Quantizing them too, the side network trained on
# the int8 graph's own activations lost 12 points on Rotten Tomatoes (chat prompt, 600 train / 400
# held out, 3 seeds: 0.688 against fp32's 0.804); with them in fp32 it scored 0.808, at half the
# fp32 graph's CPU time (64 prompts: 4.8 CPU-s against 9.5; every MatMul quantized: 3.2) and last-layer
# cosine to fp32 0.976 (0.891). Embeddings (Gather) stay fp32 too: only MatMuls are quantized.
INT8_SETTINGS: dict[str, Any] = {"weight_type": "QInt8", "per_channel": True, "reduce_range": True,
                                 "op_types": ["MatMul"], "fp32": "MLP down projections"}


def down_projections(path: Path) -> list[str]:
    """MatMul nodes whose constant weight maps a width above the model's hidden size down to a
    narrower one: the MLP's down projections (SmolLM2's mlp.down_proj, BERT's output.dense). The
    hidden size is the commonest input width of the weights (q, k, v, o, gate and up all read it),
    so k/v projections of grouped-query attention (hidden in, narrower out) are not among them."""
    from collections import Counter

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    mats = [(n.name, shapes.get(n.input[1])) for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2]
    mats2 = [(name, w) for name, w in mats if w is not None and len(w) == 2]
    if not mats2:
        return []
    hidden = Counter(w[0] for _, w in mats2).most_common(1)[0][0]
    return [name for name, w in mats2 if w[0] > hidden and w[1] < w[0]]


def check_quantize(quantize: str | None) -> str | None:
    if quantize is None or quantize in ("", "none", "fp32", "float32"):
        return None
    q = quantize.lower()
    if q not in QUANT_CHOICES:
        raise ExportError(
            f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANT_CHOICES)}"
        )
    return q


class _DropAdvice(logging.Filter):
    """onnxruntime.quantization logs advice on the root logger; keep real warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """MatMul weights to int8 (per channel, 7-bit range), activations quantized on the fly; the down
    projections kept in fp32 (see INT8_SETTINGS)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = down_projections(src)

    root = logging.getLogger()
    # logging.warning() would call basicConfig() on a handler-less root: avoid
    # leaving a handler behind in the caller's process.
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    drop = _DropAdvice()
    root.addFilter(drop)
    try:
        quantize_dynamic(
            model_input=str(src),
            model_output=str(dst),
            weight_type=QuantType.QInt8,
            per_channel=bool(INT8_SETTINGS["per_channel"]),
            reduce_range=bool(INT8_SETTINGS["reduce_range"]),
            op_types_to_quantize=list(INT8_SETTINGS["op_types"]),
            nodes_to_exclude=keep,
            use_external_data_format=False,
        )
    except Exception as e:  # onnxruntime raises plain Exceptions here
        raise ExportError(f"int8 quantization failed: {e}") from e
    finally:
        root.removeFilter(drop)
        if placeholder is not None:
            root.removeHandler(placeholder)
    return {**INT8_SETTINGS, "fp32_nodes": len(keep)}
