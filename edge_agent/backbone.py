"""The exported backbone on the board: tokenizer.json + backbone.onnx (+ backbone.onnx.data) + manifest.json.

Only numpy, onnxruntime, tokenizers and the standard library: no torch here.

    bb = Backbone.load("backbone/", threads=2)
    ids = bb.encode(["Review: great\\nSentiment:"], max_length=128)
    states, logits = bb.run(ids)      # [N, L+1, d] float32, [N, V] float32 or None
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from schemas.fingerprint import data_file, graph_fingerprint
from schemas.manifest import BackboneError, BackboneManifest, read_manifest

__all__ = ["Backbone", "BackboneError", "read_manifest", "release_freed_memory"]



def release_freed_memory() -> None:
    """Give freed heap back to the OS (glibc): loading a graph parses the whole
    file, and without this a board keeps up to ~0.5 GB of freed buffers for
    SmolLM2 (RSS after load 0.6-0.9 GB, varying run to run; 0.61 GB with it)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        pass


class Backbone:
    """A loaded backbone: tokenizer + ONNX Runtime session + manifest."""

    def __init__(self, directory: Path, manifest: BackboneManifest, tokenizer: Any, session: Any):
        self.directory = directory
        self.manifest = manifest
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.session = session  # onnxruntime.InferenceSession
        self.fingerprint: str = manifest.fingerprint
        self.num_layers: int = manifest.num_layers
        self.hidden_size: int = manifest.hidden_size
        self.vocab_size: int = manifest.vocab_size
        self.pivot: str = manifest.pivot
        self.pad_id: int = manifest.pad_token_id
        self.prefix_ids: list[int] = list(manifest.prefix_ids)
        self.suffix_ids: list[int] = list(manifest.suffix_ids)
        self.add_bos: bool = manifest.add_bos
        self.quantization: str | None = manifest.quantization
        self.max_positions: int | None = manifest.max_positions
        outputs = [o.name for o in session.get_outputs()]
        self._outputs = ["pivot_states"] + (["pivot_logits"] if "pivot_logits" in outputs else [])
        self.has_logits = "pivot_logits" in self._outputs

    # -- loading ---------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, threads: int = 2, verify: bool = True) -> Backbone:
        """Read manifest.json, tokenizer.json, backbone.onnx; check the fingerprint."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        d = Path(directory).expanduser()
        manifest = read_manifest(d)
        onnx_path = d / manifest.onnx_file
        tok_path = d / manifest.tokenizer_file
        for p in (onnx_path, tok_path):
            if not p.is_file():
                raise BackboneError(f"backbone folder {str(d)!r} lacks {p.name}")
        if verify:
            actual = graph_fingerprint(onnx_path)
            if actual != manifest.fingerprint:
                weights = data_file(onnx_path)
                names = onnx_path.name + (f" + {weights.name}" if weights.exists() else "")
                raise BackboneError(
                    f"fingerprint mismatch: {names} has sha256 {actual[:16]}..., "
                    f"the manifest says {manifest.fingerprint[:16]}... (re-export the backbone)"
                )
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise BackboneError(f"corrupt tokenizer {str(tok_path)!r}: {e}") from e
        tokenizer.no_truncation()
        tokenizer.no_padding()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: on a board that shares its cores (the agent,
        # MQTT, other services) spinning burns CPU for nothing. Measured on a busy 2-core machine,
        # 64 chat-prompt forward passes of SmolLM2: 13.3 CPU-s / 61.9 s spinning, 9.2 / 45.7 without.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Exception subclasses
            raise BackboneError(f"cannot load {str(onnx_path)!r}: {e}") from e
        release_freed_memory()
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if inputs != {"input_ids", "attention_mask"} or "pivot_states" not in outputs:
            raise BackboneError(
                f"{onnx_path.name} is not a pivot backbone graph (inputs {sorted(inputs)}, "
                f"outputs {sorted(outputs)})"
            )
        return cls(d, manifest, tokenizer, session)

    # -- tokenization ----------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without any special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode(self, texts: Sequence[str], max_length: int = 128) -> list[list[int]]:
        """Token ids with the model's special tokens, at most max_length each.

        Truncation keeps what the pivot needs: a causal model (pivot = last
        token) keeps the LAST tokens of the text (the prompt's suffix, e.g.
        "Sentiment:"), and its BOS; an encoder (pivot = first token) keeps the
        FIRST tokens, starting with CLS and ending with SEP.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not one string")
        budget = int(max_length) - len(self.prefix_ids) - len(self.suffix_ids)
        if budget < 1:
            raise ValueError(
                f"max_length {max_length} leaves no room for text next to the "
                f"{len(self.prefix_ids) + len(self.suffix_ids)} special tokens"
            )
        if self.max_positions is not None and max_length > self.max_positions:
            raise ValueError(
                f"max_length {max_length} exceeds the model's {self.max_positions} positions"
            )
        out = []
        for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False):
            ids = list(enc.ids)
            if len(ids) > budget:
                ids = ids[-budget:] if self.pivot == "last" else ids[:budget]
            out.append(self.prefix_ids + ids + self.suffix_ids)
        return out

    # -- inference -------------------------------------------------------
    def run(
        self, token_ids: Sequence[Sequence[int]], batch_size: int = 8,
        on_batch: Callable[[], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Pivot states [N, L+1, d] and logits [N, V] (None without an LM head), float32.

        Sequences are sorted by length and padded on the right per batch;
        results come back in input order. ``on_batch`` is called after each
        batch (the agent pets systemd's watchdog there).
        """
        n = len(token_ids)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        seqs: list[np.ndarray] = []
        for i, s in enumerate(token_ids):
            a = np.asarray(list(s))
            if a.size == 0:
                raise ValueError(f"sequence {i} is empty")
            if a.dtype.kind not in "iu":
                raise ValueError(f"sequence {i} holds non-integer token ids ({a.dtype})")
            if a.min() < 0 or a.max() >= self.vocab_size:
                raise ValueError(f"sequence {i} has token ids outside [0, {self.vocab_size})")
            if self.max_positions is not None and a.size > self.max_positions:
                raise ValueError(
                    f"sequence {i} is longer ({a.size}) than the model's {self.max_positions} positions"
                )
            seqs.append(a.astype(np.int64))
        states = np.empty((n, self.num_layers + 1, self.hidden_size), dtype=np.float32)
        logits = np.empty((n, self.vocab_size), dtype=np.float32) if self.has_logits else None
        order = sorted(range(n), key=lambda i: len(seqs[i]))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            t = max(len(seqs[i]) for i in idx)
            ids = np.full((len(idx), t), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), t), dtype=np.int64)
            for row, i in enumerate(idx):
                ids[row, : len(seqs[i])] = seqs[i]
                mask[row, : len(seqs[i])] = 1
            outs = self.session.run(self._outputs, {"input_ids": ids, "attention_mask": mask})
            states[idx] = outs[0]
            if logits is not None:
                logits[idx] = outs[1]
            if on_batch is not None:
                on_batch()
        return states, logits

    def __repr__(self) -> str:
        return (
            f"Backbone({str(self.directory)!r}, {self.manifest.model_type}, "
            f"layers={self.num_layers}, width={self.hidden_size}, pivot={self.pivot}, "
            f"quantization={self.quantization}, fingerprint={self.fingerprint[:12]}...)"
        )
