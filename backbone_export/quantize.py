"""Quantized graphs of an exported fp32 graph (ONNX Runtime): dynamic int8 (``int8``) and block-wise
weight-only MatMulNBits (``w8b32``: 8-bit weights in blocks of 32, ...); see GRAPHS."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import ExportError

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


def down_projections(path: Path | Any) -> list[str]:
    """MatMul nodes whose constant weight maps a width above the model's hidden size down to a
    narrower one: the MLP's down projections (SmolLM2's mlp.down_proj, BERT's output.dense). The
    hidden size is the commonest input width of the weights (q, k, v, o, gate and up all read it),
    so k/v projections of grouped-query attention (hidden in, narrower out) are not among them."""
    from collections import Counter

    import onnx

    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    mats = [(n.name, shapes.get(n.input[1])) for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2]
    mats2 = [(name, w) for name, w in mats if w is not None and len(w) == 2]
    if not mats2:
        return []
    hidden = Counter(w[0] for _, w in mats2).most_common(1)[0][0]
    return [name for name, w in mats2 if w[0] > hidden and w[1] < w[0]]


#: Weight-only block-wise quantized MatMuls (ONNX Runtime's com.microsoft MatMulNBits): every MatMul
#: with a constant weight (q, k, v, o, gate, up, down of each layer; the tied LM head reads the
#: embedding as its first input and stays fp32, as does the embedding's Gather), one scale and zero
#: point per block of `block` input rows. ``level`` is the op's accuracy_level: 4 computes with int8
#: activations quantized per block of the same length on the fly (the fast path on x86), 1 in fp32
#: (the weights dequantized per block: weight-only, but no faster than fp32 on this CPU).
#: Measured on this repository's 2-core AMD EPYC (AVX-512 VNNI), see the README's backbone benchmark.
NBITS: dict[str, dict[str, Any]] = {
    f"w{bits}b{block}{suffix}": {"scheme": "MatMulNBits", "bits": bits, "block_size": block,
                                 "accuracy_level": level, "symmetric": False, "op_types": ["MatMul"]}
    for bits in (8, 4) for block in (32, 128) for suffix, level in (("", 4), ("-fp32", 1))
}
#: SmoothQuant (backbone_export/smooth.py, alpha 0.7) then the int8 graph's dynamic quantization of the
#: MatMuls before the down projections; the down projections fp32 (``int8-sq``) or MatMulNBits
#: 8-bit blocks of 32 with int8 compute (``int8-sq-w8``), whose per-block activation scales keep
#: the gated product's outliers in their own block.
SMOOTH: dict[str, dict[str, Any]] = {
    "int8-sq": {**INT8_SETTINGS, "smooth_alpha": 0.7},
    "int8-sq-w8": {**INT8_SETTINGS, "smooth_alpha": 0.7, "fp32": None, "down": NBITS["w8b32"]},
}
#: Every graph ``sidetune export --quantize`` builds besides fp32 (``None``).
GRAPHS: dict[str, dict[str, Any]] = {"int8": INT8_SETTINGS, **SMOOTH, **NBITS}
QUANT_CHOICES = tuple(GRAPHS)


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


def quantize_int8(src: Path | Any, dst: Path) -> dict[str, Any]:
    """MatMul weights to int8 (per channel, 7-bit range), activations quantized on the fly; the down
    projections kept in fp32 (see INT8_SETTINGS). ``src``: a path or an onnx ModelProto."""

    keep = down_projections(src)
    quantize_dynamic_except(src if not isinstance(src, (str, Path)) else str(src), dst, keep)
    return {**INT8_SETTINGS, "fp32_nodes": len(keep)}


def quantize_nbits(src: Path | Any, dst: Path, graph: str, only: list[str] | None = None) -> dict[str, Any]:
    """The MatMuls of ``src`` (a path, weights beside it or inside, or a ModelProto) as MatMulNBits of
    NBITS[graph] (``only``: just these nodes); ``dst`` one file (the exporter moves its weights beside
    it)."""
    settings = NBITS[graph]
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        model = src if isinstance(src, onnx.ModelProto) else onnx.load(str(src))
        cfg = mq.DefaultWeightOnlyQuantConfig(
            block_size=settings["block_size"], is_symmetric=settings["symmetric"],
            accuracy_level=settings["accuracy_level"], bits=settings["bits"],
            op_types_to_quantize=tuple(settings["op_types"]))
        quant = mq.MatMulNBitsQuantizer(
            model, bits=settings["bits"], block_size=settings["block_size"],
            is_symmetric=settings["symmetric"], accuracy_level=settings["accuracy_level"],
            nodes_to_include=only, algo_config=cfg)
        quant.process()
        nodes = sum(1 for n in quant.model.model.graph.node if n.op_type == "MatMulNBits")
        quant.model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as e:  # onnx and onnxruntime raise plain Exceptions here
        raise ExportError(f"{graph} quantization failed: {e}") from e
    finally:
        quiet.setLevel(level)
    return {**settings, "quantized_nodes": nodes}


def quantize_smooth(src: Path, dst: Path, graph: str, calibration: list[list[int]]) -> dict[str, Any]:
    """SMOOTH[graph]: smoothed (calibrated on ``calibration``), then int8; see SMOOTH."""
    import onnx

    from .smooth import smooth_graph

    settings = SMOOTH[graph]
    if not calibration:
        raise ExportError(f"{graph} needs calibration sequences")
    try:
        model = onnx.load(str(src))
        done = smooth_graph(model, calibration, float(settings["smooth_alpha"]))
    except Exception as e:  # onnx and onnxruntime raise plain Exceptions here
        raise ExportError(f"{graph}: smoothing failed: {e}") from e
    if "down" not in settings:
        return {**settings, **done, **quantize_int8(model, dst), "smooth_alpha": settings["smooth_alpha"]}
    downs = down_projections(model)
    mid = dst.with_name(dst.name + ".int8")
    try:
        quantize_dynamic_except(model, mid, downs)
        nb = quantize_nbits(onnx.load(str(mid)), dst, "w8b32", only=downs)
    finally:
        mid.unlink(missing_ok=True)
    return {**settings, **done, "down_nodes": nb["quantized_nodes"]}


def quantize_dynamic_except(model: Any, dst: Path, keep: list[str]) -> None:
    """INT8_SETTINGS' dynamic quantization of every MatMul but ``keep``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    # logging.warning() would call basicConfig() on a handler-less root: avoid
    # leaving a handler behind in the caller's process.
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    drop = _DropAdvice()
    root.addFilter(drop)
    try:
        quantize_dynamic(model_input=model, model_output=str(dst), weight_type=QuantType.QInt8,
                         per_channel=bool(INT8_SETTINGS["per_channel"]),
                         reduce_range=bool(INT8_SETTINGS["reduce_range"]),
                         op_types_to_quantize=list(INT8_SETTINGS["op_types"]),
                         nodes_to_exclude=keep, use_external_data_format=False)
    except Exception as e:  # onnxruntime raises plain Exceptions here
        raise ExportError(f"int8 quantization failed: {e}") from e
    finally:
        root.removeFilter(drop)
        if placeholder is not None:
            root.removeHandler(placeholder)


def calibration_sequences(tokenizer_file: Path, prefix: list[int], suffix: list[int]) -> list[list[int]]:
    """CALIBRATION_TEXTS as the board encodes them (special tokens around, no truncation)."""
    from tokenizers import Tokenizer

    from .smooth import CALIBRATION_TEXTS

    tok = Tokenizer.from_file(str(tokenizer_file))
    return [prefix + tok.encode(t, add_special_tokens=False).ids + suffix for t in CALIBRATION_TEXTS]


def quantize_graph(src: Path, dst: Path, graph: str,
                   calibration: list[list[int]] | None = None) -> dict[str, Any]:
    """``graph`` (one of GRAPHS) of the fp32 graph ``src`` written as ``dst``; its settings.
    ``calibration``: token sequences for the graphs that calibrate (SMOOTH)."""
    if graph == "int8":
        return quantize_int8(src, dst)
    if graph in SMOOTH:
        return quantize_smooth(src, dst, graph, calibration or [])
    if graph in NBITS:
        return quantize_nbits(src, dst, graph)
    raise ExportError(f"unknown quantization {graph!r}; choose one of: {', '.join(QUANT_CHOICES)}")
