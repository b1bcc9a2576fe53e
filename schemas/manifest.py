"""The manifest of an exported backbone: one model, written by the exporter, read by everyone else.

A backbone folder holds ``backbone.onnx`` (pivot outputs) with its weights in
``backbone.onnx.data`` (older exports: one file), ``tokenizer.json`` and
``manifest.json``. The exporter (backbone_export) builds a
:class:`BackboneManifest` and writes it; the board (edge_agent/backbone.py),
the benchmarks (sidetune/bench) and the demo read it with :func:`read_manifest`,
which checks it once, so no reader needs its own checks or defaults.

    m = read_manifest(folder)          # BackboneError with one clear line if absent/corrupt
    m.fingerprint, m.num_layers, m.hidden_size, m.pivot, m.prefix_ids ...
    m.write(folder)                    # atomic; the exporter writes it last
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.errors import ConfigurationError
from schemas.files import atomic_write

MANIFEST_NAME = "manifest.json"
ONNX_NAME = "backbone.onnx"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION: Literal[1] = 1

NonNegInt = Annotated[int, Field(ge=0, strict=True)]


class BackboneError(ConfigurationError):
    """The backbone folder is missing, corrupt, or does not match its manifest."""


class BackboneManifest(BaseModel):
    """What ``manifest.json`` holds (fields the exporter could not know are null/absent)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    fingerprint: str  # sha256 hex of backbone.onnx, then backbone.onnx.data (schemas/fingerprint.py)
    onnx_file: str = ONNX_NAME
    onnx_bytes: NonNegInt | None = None  # the graph's bytes, its weights file included
    tokenizer_file: str = TOKENIZER_NAME
    model_type: str | None = None
    architecture: str | None = None
    kind: Literal["causal", "encoder"] | None = None
    pivot: str  # "last" (causal) or "first" (encoder): the token the pivot states are taken at
    num_layers: NonNegInt
    hidden_size: NonNegInt
    vocab_size: NonNegInt
    max_position_embeddings: int | None = None
    has_logits: bool | None = None
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    outputs: tuple[str, ...] = ("pivot_states",)
    source: str | None = None
    source_kind: str | None = None
    source_path: str | None = None
    opset: int | None = None
    dtype: str = "float32"  # of the graph's inputs and outputs
    quantization: str | None = None  # None (fp32 weights) or the scheme, e.g. "int8"
    quantization_settings: dict[str, Any] | None = None
    # tokenizer: the runtime builds prefix_ids + content + suffix_ids
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: NonNegInt
    unk_token_id: int | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    add_bos: bool = False
    prefix_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()
    tokenizer_matches_source: bool | None = None
    # the exporter's check of the graph against torch
    verify_rel_error: float | None = None
    verify_cosine_min: float | None = None
    verify_logits_rel_error: float | None = None
    verify_fp32_rel_error: float | None = None
    verify_samples: int | None = None
    exporter: dict[str, str] | None = None
    export_seconds: float | None = None
    created: str | None = None

    @field_validator("fingerprint")
    @classmethod
    def _sha256(cls, v: str) -> str:
        if not (len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
            raise ValueError("fingerprint is not a sha256 hex digest")
        return v

    @field_validator("pivot")
    @classmethod
    def _pivot(cls, v: str) -> str:
        if v not in ("last", "first"):
            raise ValueError(f"unknown pivot {v!r}")
        return v

    @property
    def max_positions(self) -> int | None:
        mp = self.max_position_embeddings
        return mp if mp is not None and mp > 0 else None

    def to_json(self) -> dict[str, Any]:
        """The JSON object as written: the fields that were given, nothing filled in."""
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        atomic_write(path, json.dumps(self.to_json(), indent=2) + "\n", mode=0o644)
        return path


def _explain(e: ValidationError) -> str:
    missing = [str(err["loc"][0]) for err in e.errors() if err["type"] == "missing"]
    if missing:
        return f"missing {', '.join(missing)}"
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg if where and where in msg else f"{where}: {msg}"


def parse_manifest(data: Any, where: str = MANIFEST_NAME) -> BackboneManifest:
    """A manifest from its decoded JSON; BackboneError naming the first problem."""
    if not isinstance(data, dict):
        raise BackboneError(f"corrupt manifest {where!r}: not a JSON object")
    try:
        return BackboneManifest.model_validate(data)
    except ValidationError as e:
        raise BackboneError(f"corrupt manifest {where!r}: {_explain(e)}") from None


def read_manifest(directory: str | Path) -> BackboneManifest:
    """``manifest.json`` of a backbone folder, checked; BackboneError if absent or corrupt."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise BackboneError(f"backbone folder {str(d)!r} does not exist")
    path = d / MANIFEST_NAME
    if not path.is_file():
        raise BackboneError(f"backbone folder {str(d)!r} has no {MANIFEST_NAME} (export one first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackboneError(f"corrupt manifest {str(path)!r}: {e}") from e
    return parse_manifest(data, str(path))
