"""The board's quantized graphs (backbone_export/quantize.py GRAPHS, smooth.py) on the tiny test llama:
smoothing is the same function in fp32, each graph's pivot states and logits stay close to fp32's, the
graph holds the ops it says, and the board (edge_agent.Backbone) runs it."""

from __future__ import annotations

import numpy as np
import pytest

from backbone_export.onnx_export import min_cosine, pad_batch, rel_error

try:
    from tests.tiny_models import exported_tiny
except ImportError:  # tests/ itself on sys.path
    from tiny_models import exported_tiny

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _run(path_or_bytes, seqs: list[list[int]], pad_id: int, side: str = "right") -> dict[str, np.ndarray]:
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    ids, mask = pad_batch(seqs, pad_id, side)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": mask}), strict=True))


def _seqs(manifest, n: int = 6, seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 30, size=n)
    return [list(manifest.prefix_ids) + rng.integers(5, manifest.vocab_size, size=int(t)).tolist()
            for t in lengths]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return exported_tiny(tmp_path_factory, "llama")


def test_smoothing_is_the_same_function(fp32):
    """SmoothQuant's scales moved into the RMSNorm weights and up's columns: fp32 outputs unchanged."""
    from backbone_export.quantize import calibration_sequences
    from backbone_export.smooth import smooth_graph

    out, manifest = fp32
    model = onnx.load(str(out / "backbone.onnx"))
    calib = calibration_sequences(out / "tokenizer.json", list(manifest.prefix_ids), list(manifest.suffix_ids))
    done = smooth_graph(model, calib, 0.7)
    # per layer: q/k/v's input, gate/up's input, down's input
    assert done == {"smoothed_activations": 3 * manifest.num_layers, "calibration_sequences": len(calib)}
    # each weight it scaled is its node's own now (the tiny model's equal RMSNorm weights are shared):
    # q, k, v, the input norm, gate, up (rows and columns), the post-attention norm, down
    smoothed = [t.name for t in model.graph.initializer if ".smooth." in t.name]
    assert len(smoothed) == 8 * manifest.num_layers
    assert sum("layernorm" in n for n in smoothed) == 2 * manifest.num_layers
    seqs = _seqs(manifest)
    for side in ("right", "left"):
        a = _run(model.SerializeToString(), seqs, manifest.pad_token_id, side)
        b = _run(out / "backbone.onnx", seqs, manifest.pad_token_id, side)
        assert rel_error(a["pivot_states"], b["pivot_states"]) <= 1e-4
        assert rel_error(a["pivot_logits"], b["pivot_logits"]) <= 1e-4


@pytest.mark.parametrize("graph", ["int8-sq-w8", "int8-sq", "w8b32"])
def test_quantized_graph_parity(tmp_path_factory, fp32, graph):
    from edge_agent.backbone import Backbone

    fp_out, fp_manifest = fp32
    out, manifest = exported_tiny(tmp_path_factory, "llama", quantize=graph)
    assert manifest.quantization == graph and manifest.fingerprint != fp_manifest.fingerprint
    assert manifest.verify_fp32_rel_error <= 1e-4
    assert manifest.verify_cosine_min > 0.98  # every layer's pivot state against torch's
    nodes = onnx.load(str(out / "backbone.onnx"), load_external_data=False).graph.node
    down = {n.op_type for n in nodes if "down_proj" in n.name and n.op_type != "Constant"}
    other = {n.op_type for n in nodes if "q_proj" in n.name and n.op_type != "Constant"}
    if graph == "int8-sq-w8":
        assert down == {"MatMulNBits"} and "MatMulNBits" not in other
        assert other & {"MatMulInteger", "DynamicQuantizeMatMul"}
        assert manifest.quantization_settings["down_nodes"] == manifest.num_layers
    elif graph == "int8-sq":
        assert down == {"MatMul"} and other & {"MatMulInteger", "DynamicQuantizeMatMul"}
    else:
        assert down == {"MatMulNBits"} and other == {"MatMulNBits"}
    assert "MatMul" in {n.op_type for n in nodes}  # the LM head (the tied embedding) stays fp32
    seqs = _seqs(manifest, n=8, seed=4)
    a = _run(out / "backbone.onnx", seqs, manifest.pad_token_id)
    b = _run(fp_out / "backbone.onnx", seqs, manifest.pad_token_id)
    assert min_cosine(a["pivot_states"], b["pivot_states"]) > 0.98
    assert min_cosine(a["pivot_logits"], b["pivot_logits"]) > 0.98
    # the board loads it (fingerprint checked) and gives the same numbers on the same batch (the int8
    # activations' dynamic scale is the batch's)
    bb = Backbone.load(out, threads=1)
    states, logits = bb.run(seqs, batch_size=len(seqs))
    assert rel_error(states, a["pivot_states"]) <= 1e-4 and rel_error(logits, a["pivot_logits"]) <= 1e-4


def test_unknown_graph_is_a_clear_error(tmp_path, fp32):
    from backbone_export import ExportError, export_backbone
    from backbone_export.quantize import QUANT_CHOICES

    _, manifest = fp32
    with pytest.raises(ExportError, match="unknown quantization 'int3'; choose one of: int8, "):
        export_backbone(manifest.source, tmp_path / "o", quantize="int3", progress=lambda _m: None)
    assert {"int8", "int8-sq-w8", "w8b32", "w4b32"} <= set(QUANT_CHOICES)


def test_sidetune_export_builds_a_named_graph(tmp_path, capsys, fp32):
    from schemas.manifest import read_manifest
    from sidetune.cli import main

    _, manifest = fp32
    assert main(["export", "--model", manifest.source, "--out", str(tmp_path / "g"), "--quantize", "w8b128"]) == 0
    got = read_manifest(tmp_path / "g")
    assert got.quantization == "w8b128" and got.quantization_settings["block_size"] == 128
    assert got.verify_cosine_min > 0.98
    with pytest.raises(SystemExit) as e:  # argparse: not a graph it builds
        main(["export", "--model", manifest.source, "--out", str(tmp_path / "h"), "--quantize", "int3"])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
