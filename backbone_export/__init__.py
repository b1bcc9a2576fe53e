"""Backbone export: a Hugging Face model or GGUF -> backbone.onnx + tokenizer.json + manifest.json.

Public API (the one command line is ``sidetune export``, in sidetune/cli.py)::

    export_backbone(model, out_dir, quantize=None, opset=17, progress=print) -> BackboneManifest
    ExportError                         # every user-facing failure (a UsageError: exit 2)

Depends on ``schemas`` only within the project (the manifest is schemas.manifest).
Heavy imports (torch, transformers, onnxruntime) happen inside the functions,
so importing this package is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ExportError

if TYPE_CHECKING:
    from schemas.manifest import BackboneManifest

__all__ = ["ExportError", "export_backbone"]


def export_backbone(
    model: str | Path,
    out_dir: Path,
    quantize: str | None = None,
    opset: int = 17,
    progress: Callable[[str], None] = print,
) -> BackboneManifest:
    """See backbone_export.export.export_backbone."""
    from .export import export_backbone as _export

    return _export(model, out_dir, quantize=quantize, opset=opset, progress=progress)
