"""A backbone's fingerprint: the sha256 of its ``backbone.onnx``, computed the same way
by the exporter (which writes it into the manifest) and the board (which checks it)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
