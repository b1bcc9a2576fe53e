"""export_backbone: HF directory / GGUF -> backbone.onnx + tokenizer.json + manifest.json."""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.fingerprint import data_file, graph_bytes, graph_fingerprint
from schemas.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ONNX_NAME,
    TOKENIZER_NAME,
    BackboneManifest,
)

from .errors import ExportError
from .load import CAUSAL, LoadedModel, load_model
from .locate import locate_model
from .onnx_export import INPUT_NAMES, export_onnx, externalize_weights, verify_onnx
from .quantize import calibration_sequences, check_quantize, quantize_graph

# Review-like texts for the parity check (every tiny test vocabulary covers them).
VERIFY_TEXTS = (
    "Review: a good movie .\nSentiment:",
    "Review: the plot was boring and the acting was terrible , but the music was great !\nSentiment:",
    "Review: i loved it\nSentiment:",
)
FP32_TOLERANCE = 1e-3  # relative error above which an fp32 export is rejected


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if value is not None else None


def prepare_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ExportError(f"output folder {str(out_dir)!r} is not a directory: {e}") from e
    except OSError as e:
        raise ExportError(f"cannot create output folder {str(out_dir)!r}: {e.strerror or e}") from e
    if not out_dir.is_dir():
        raise ExportError(f"output folder {str(out_dir)!r} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ExportError(
            f"output folder {str(out_dir)!r} is not writable: {e.strerror or e}"
        ) from e
    return out_dir.resolve()


def _export_tokenizer(loaded: LoadedModel, path: Path) -> dict[str, Any]:
    """Save tokenizer.json (no truncation/padding) and describe its special tokens."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(loaded.tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(path))
    tok = Tokenizer.from_file(str(path))
    probe = tok.encode("hello world")
    special = probe.special_tokens_mask
    n_prefix = next((i for i, s in enumerate(special) if not s), len(special))
    n_suffix = next((i for i, s in enumerate(reversed(special)) if not s), 0)
    ids = probe.ids
    prefix = ids[:n_prefix]
    suffix = ids[len(ids) - n_suffix :] if n_suffix else []
    hf = loaded.tokenizer
    cfg = loaded.config
    bos = _first_id(
        hf.bos_token_id if hf.bos_token_id is not None else getattr(cfg, "bos_token_id", None)
    )
    eos = _first_id(
        hf.eos_token_id if hf.eos_token_id is not None else getattr(cfg, "eos_token_id", None)
    )
    pad = _first_id(
        hf.pad_token_id if hf.pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    )
    if pad is None:
        pad = eos if eos is not None else 0
    info: dict[str, Any] = {
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "unk_token_id": _first_id(hf.unk_token_id),
        "add_bos": bool(bos is not None and prefix[:1] == [bos]),
        "prefix_ids": prefix,
        "suffix_ids": suffix,
    }
    if loaded.kind != CAUSAL:
        info["cls_token_id"] = _first_id(hf.cls_token_id)
        info["sep_token_id"] = _first_id(hf.sep_token_id)
    # The runtime rebuilds prefix + content + suffix; check it gives what HF gives.
    same = True
    for text in VERIFY_TEXTS:
        content = tok.encode(text, add_special_tokens=False).ids
        mine = prefix + content + suffix
        if mine != tok.encode(text).ids or mine != list(hf(text)["input_ids"]):
            same = False
    info["tokenizer_matches_source"] = same
    return info


def export_backbone(
    model: str | Path,
    out_dir: Path,
    quantize: str | None = None,
    opset: int = 17,
    progress: Callable[[str], None] = print,
) -> BackboneManifest:
    """Export MODEL into out_dir; return the manifest (also written as manifest.json).

    MODEL: ``smollm2-135m``, a Hugging Face model directory, or a .gguf file.
    quantize: None (fp32) or one of QUANT_CHOICES (backbone_export/quantize.py GRAPHS).
    Raises ExportError with a clear message on any user-facing failure.
    """
    started = time.perf_counter()
    q = check_quantize(quantize)
    source = locate_model(model)
    out = prepare_out_dir(Path(out_dir))

    t = time.perf_counter()
    progress(f"loading {source.spec} ({source.kind}) with transformers ...")
    loaded = load_model(source)
    cfg = loaded.config
    progress(
        f"loaded {cfg.model_type} ({loaded.kind}, {cfg.num_hidden_layers} layers, "
        f"width {cfg.hidden_size}) in {time.perf_counter() - t:.1f} s"
    )

    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp_name:
        tmp = Path(tmp_name)
        tok_info = _export_tokenizer(loaded, tmp / TOKENIZER_NAME)
        if not tok_info["tokenizer_matches_source"]:
            progress("warning: tokenizer.json does not reproduce the source tokenizer exactly")

        fp32_path = tmp / "fp32.onnx"
        t = time.perf_counter()
        progress(f"exporting to ONNX (opset {opset}, legacy exporter) ...")
        outputs = export_onnx(loaded, fp32_path, opset=opset)
        export_seconds = time.perf_counter() - t
        progress(f"exported {fp32_path.stat().st_size / 1e6:.1f} MB in {export_seconds:.1f} s")

        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tmp / TOKENIZER_NAME))
        seqs = [
            tok_info["prefix_ids"]
            + tok.encode(x, add_special_tokens=False).ids
            + tok_info["suffix_ids"]
            for x in VERIFY_TEXTS
        ]
        t = time.perf_counter()
        progress("verifying the ONNX graph against torch (left and right padding) ...")
        fp32_report = verify_onnx(fp32_path, loaded, seqs, tok_info["pad_token_id"])
        progress(
            f"fp32 max relative error {fp32_report['verify_rel_error']:.2e} "
            f"({time.perf_counter() - t:.1f} s)"
        )
        if not fp32_report["verify_rel_error"] <= FP32_TOLERANCE:
            raise ExportError(
                f"the exported graph does not match torch: relative error "
                f"{fp32_report['verify_rel_error']:.3g} > {FP32_TOLERANCE:g}"
            )
        report = fp32_report
        final = fp32_path
        quant_settings = None
        if q is not None:
            t = time.perf_counter()
            progress(f"quantizing to {q} (ONNX Runtime) ...")
            final = tmp / f"{q}.onnx"
            calib = calibration_sequences(
                tmp / TOKENIZER_NAME, tok_info["prefix_ids"], tok_info["suffix_ids"])
            quant_settings = quantize_graph(fp32_path, final, q, calibration=calib)
            progress(
                f"quantized to {final.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s"
            )
            progress(f"verifying the {q} graph against torch ...")
            report = verify_onnx(final, loaded, seqs, tok_info["pad_token_id"])
            report["verify_fp32_rel_error"] = fp32_report["verify_rel_error"]
            progress(
                f"{q} max relative error {report['verify_rel_error']:.2e}, "
                f"min cosine {report['verify_cosine_min']:.4f}"
            )
            fp32_path.unlink()

        # The weights beside the graph (backbone.onnx.data): the board maps them instead of parsing them.
        staged = tmp / "graph" / ONNX_NAME
        staged.parent.mkdir()
        externalize_weights(final, staged)
        final.unlink()
        fingerprint = graph_fingerprint(staged)
        import onnxruntime
        import torch
        import transformers

        archs = list(getattr(cfg, "architectures", None) or [])
        fields: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "onnx_file": ONNX_NAME,
            "onnx_bytes": graph_bytes(staged),
            "tokenizer_file": TOKENIZER_NAME,
            "model_type": cfg.model_type,
            "architecture": archs[0] if archs else type(loaded.model).__name__,
            "kind": loaded.kind,
            "pivot": loaded.pivot,
            "num_layers": int(cfg.num_hidden_layers),
            "hidden_size": int(cfg.hidden_size),
            "vocab_size": int(cfg.vocab_size),
            "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
            "has_logits": loaded.kind == CAUSAL,
            "inputs": list(INPUT_NAMES),
            "outputs": outputs,
            "source": source.spec,
            "source_kind": source.kind,
            "source_path": str(source.path),
            "opset": opset,
            "dtype": "float32",
            "quantization": q,
            "quantization_settings": quant_settings,
            **tok_info,
            **report,
            "verify_samples": len(seqs),
            "exporter": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "export_seconds": round(time.perf_counter() - started, 2),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest = BackboneManifest.model_validate(fields)
        # Replace the files; the manifest last, so a crash in between leaves a
        # fingerprint mismatch (refused by the runtime), never a silent mix.
        stale = out / MANIFEST_NAME
        if stale.exists():
            stale.unlink()
        os.replace(tmp / TOKENIZER_NAME, out / TOKENIZER_NAME)
        if data_file(staged).exists():
            os.replace(data_file(staged), data_file(out / ONNX_NAME))
        else:
            data_file(out / ONNX_NAME).unlink(missing_ok=True)
        os.replace(staged, out / ONNX_NAME)
        manifest.write(out)
        # World-readable, whatever onnx or the umask made them (onnx creates the data file 0600):
        # the board's agent runs as its own user and reads a copy `scp -r` made with these modes.
        for path in (out / TOKENIZER_NAME, out / ONNX_NAME, data_file(out / ONNX_NAME), out / MANIFEST_NAME):
            if path.exists():
                os.chmod(path, 0o644)
    progress(
        f"wrote {out / ONNX_NAME} (fingerprint {fingerprint[:16]}...) in {manifest.export_seconds:.1f} s"
    )
    return manifest
