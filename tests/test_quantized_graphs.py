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


@pytest.mark.slow
def test_smollm2_quantized_graphs(tmp_path):
    """SmolLM2-135M: the smoothed graph is the same function in fp32, and the quantized graphs' last-layer
    pivot states stay close to fp32's on chat-format prompts (measured: int8-sq-w8 0.996, w8b32 0.9997,
    the int8 graph 0.98; README, backbone benchmark)."""
    from backbone_export import export_backbone
    from backbone_export.quantize import calibration_sequences, quantize_graph
    from backbone_export.smooth import smooth_graph

    out = tmp_path / "smol"
    manifest = export_backbone("smollm2-135m", out, progress=lambda _m: None)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = ["<|im_start|>user\nIs this review positive or negative?\n\nA gorgeous, witty, seductive movie."
             "<|im_end|>\n<|im_start|>assistant\nThe review is",
             "<|im_start|>user\nWhich outlet published this?\n\nThe central bank held rates steady on "
             "Thursday.<|im_end|>\n<|im_start|>assistant\nThe outlet is"]
    seqs = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    ref = _run(out / "backbone.onnx", seqs, manifest.pad_token_id)
    model = onnx.load(str(out / "backbone.onnx"))
    calib = calibration_sequences(out / "tokenizer.json", list(manifest.prefix_ids), list(manifest.suffix_ids))
    smooth_graph(model, calib, 0.7)
    smoothed = tmp_path / "smoothed.onnx"
    onnx.save(model, str(smoothed))
    same = _run(smoothed, seqs, manifest.pad_token_id)
    assert rel_error(same["pivot_states"], ref["pivot_states"]) <= 1e-3
    for graph, floor in (("int8-sq-w8", 0.99), ("w8b32", 0.999)):
        q = tmp_path / f"{graph}.onnx"
        quantize_graph(out / "backbone.onnx", q, graph, calibration=calib)
        got = _run(q, seqs, manifest.pad_token_id)
        assert min_cosine(got["pivot_states"][:, -1], ref["pivot_states"][:, -1]) > floor, graph


def test_graph_bench_on_the_tiny_llama(tmp_path, fp32):
    """python -m sidetune.bench.graphs: each graph's forward CPU and held-out accuracy beside fp32's on the
    same split and seeds; a second run reuses what the first measured."""
    import json

    from sidetune.bench.graphs import main, run_graphs

    backbone, manifest = fp32
    task = tmp_path / "task.toml"
    task.write_text('name = "tiny-sentiment"\ntemplate = "Review: {text}\\nSentiment:"\n'
                    'classes = ["fresh", "rotten"]\nverbalizers = [" positive", " negative"]\n')
    lines: list[str] = []
    out = tmp_path / "out"
    r = run_graphs(backbone, ["w8b32"], [str(task)], out, train=24, holdout=16, seeds=1, progress=lines.append)
    t = r["tasks"][0]
    assert (t["train"], t["holdout"]) == (24, 16) and list(t["graphs"]) == ["fp32", "w8b32"]
    g, f = t["graphs"]["w8b32"], t["graphs"]["fp32"]
    assert g["fingerprint"] != f["fingerprint"] == manifest.fingerprint
    assert 0 <= g["accuracy"] <= 1 and g["fp32_accuracy_same_seeds"] == f["accuracy"]
    assert g["cpu_s_per_sample"] > 0 and g["device_peak_rss_mb"] > 50
    assert json.loads((out / "graphs.json").read_text()) == json.loads(json.dumps(r))
    assert "| w8b32 |" in lines[-1] and "(1.00×)" in lines[-1]
    again: list[str] = []
    r2 = run_graphs(backbone, ["w8b32"], [str(task)], out, train=24, holdout=16, seeds=1, progress=again.append)
    assert sum("measured earlier" in m for m in again) == 2
    assert r2["tasks"][0]["graphs"]["w8b32"]["accuracy"] == g["accuracy"]  # same features, same seeds
    with pytest.raises(SystemExit):  # argparse: not a graph
        main(["--backbone", str(backbone), "--graph", "nope"])
