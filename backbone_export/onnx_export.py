"""torch -> ONNX (legacy TorchScript exporter) and the ONNX-vs-torch parity check."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError
from .load import CAUSAL, LoadedModel

INPUT_NAMES = ["input_ids", "attention_mask"]
STATES = "pivot_states"
LOGITS = "pivot_logits"


def export_onnx(loaded: LoadedModel, path: Path, opset: int = 17) -> list[str]:
    """Write the pivot graph of `loaded` to `path` (one file, no external data)."""
    import torch

    from .wrapper import PivotWrapper

    wrapper = PivotWrapper(loaded.model, loaded.kind).eval()
    has_logits = loaded.kind == CAUSAL
    outputs = [STATES, LOGITS] if has_logits else [STATES]
    # Trace with padding present (left on one row, right on another) so no
    # "mask is all ones" shortcut gets baked into the graph.
    vocab = int(loaded.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(low=min(5, vocab - 1), high=vocab, size=(3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, -3:] = 0
    dynamic = {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES}
    dynamic[STATES] = {0: "batch"}
    if has_logits:
        dynamic[LOGITS] = {0: "batch"}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript tracer and the legacy exporter are chatty about
            # things that do not apply here (checked by the parity step).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
            torch.onnx.export(
                wrapper,
                (ids, mask),
                str(path),
                input_names=INPUT_NAMES,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as e:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed for {loaded.source.spec!r}: {e}") from e
    extra = [p for p in path.parent.iterdir() if p != path and p.name.startswith(path.name)]
    if extra:
        raise ExportError(
            f"the exporter wrote external data files ({extra}); model too large (> 2 GB)"
        )
    return outputs


def torch_reference(loaded: LoadedModel, ids: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """States [L+1, d] and logits [V] at the pivot from the plain torch model, unpadded."""
    import torch

    x = torch.tensor([ids], dtype=torch.int64)
    with torch.no_grad():
        out = loaded.model(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            output_hidden_states=True,
            return_dict=True,
        )
    pos = len(ids) - 1 if loaded.kind == CAUSAL else 0
    states = torch.stack([h[0, pos] for h in out.hidden_states]).float().numpy()
    logits = out.logits[0, pos].float().numpy() if loaded.kind == CAUSAL else None
    return states, logits


def pad_batch(
    seqs: list[list[int]], pad_id: int, side: str = "right"
) -> tuple[np.ndarray, np.ndarray]:
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), t), dtype=np.int64)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        else:
            ids[i, t - len(s) :] = s
            mask[i, t - len(s) :] = 1
    return ids, mask


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max over all leading indices of ||a - ref|| / ||ref|| along the last axis."""
    num = np.linalg.norm(a.astype(np.float64) - ref.astype(np.float64), axis=-1)
    den = np.maximum(np.linalg.norm(ref.astype(np.float64), axis=-1), 1e-12)
    return float(np.max(num / den))


def min_cosine(a: np.ndarray, ref: np.ndarray) -> float:
    a = a.astype(np.float64)
    ref = ref.astype(np.float64)
    num = np.sum(a * ref, axis=-1)
    den = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(ref, axis=-1), 1e-12)
    return float(np.min(num / den))


def verify_onnx(
    onnx_path: Path, loaded: LoadedModel, seqs: list[list[int]], pad_id: int
) -> dict[str, Any]:
    """Run the graph on `seqs` padded right and left; compare with unpadded torch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    refs = [torch_reference(loaded, s) for s in seqs]
    ref_states = np.stack([r[0] for r in refs])
    ref_logits = None
    if loaded.kind == CAUSAL:
        ref_logits = np.stack([r[1] for r in refs if r[1] is not None])
    report: dict[str, Any] = {"verify_rel_error": 0.0, "verify_cosine_min": 1.0}
    if ref_logits is not None:
        report["verify_logits_rel_error"] = 0.0
    for side in ("right", "left"):
        ids, mask = pad_batch(seqs, pad_id, side)
        out = dict(
            zip(names, sess.run(None, {"input_ids": ids, "attention_mask": mask}), strict=True)
        )
        st = out[STATES]
        if st.shape != ref_states.shape:
            raise ExportError(
                f"exported graph gives pivot_states of shape {st.shape}, torch {ref_states.shape}"
            )
        report["verify_rel_error"] = max(report["verify_rel_error"], rel_error(st, ref_states))
        report["verify_cosine_min"] = min(report["verify_cosine_min"], min_cosine(st, ref_states))
        if ref_logits is not None:
            report["verify_logits_rel_error"] = max(
                report["verify_logits_rel_error"], rel_error(out[LOGITS], ref_logits)
            )
    return report


def externalize_weights(src: Path, dst: Path) -> None:
    """Rewrite the single-file graph ``src`` as ``dst`` + ``dst.data`` (every tensor of 1 kB or more in
    the data file). ONNX Runtime maps the data file instead of parsing a second copy of the weights,
    which is what bounded the board's memory at load (schemas/fingerprint.py)."""
    import onnx

    from schemas.fingerprint import data_file

    model = onnx.load(str(src))
    try:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file(dst).name, size_threshold=1024)
    except Exception as e:  # protobuf and I/O errors
        raise ExportError(f"cannot write {dst} with its weights beside it: {e}") from e

