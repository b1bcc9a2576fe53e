"""A backbone's fingerprint: the sha256 of its graph, computed the same way by the exporter (which
writes it into the manifest) and the board (which checks it).

A graph is ``backbone.onnx`` and, for exports that keep their weights beside it, ``backbone.onnx.data``
(ONNX external data, which ONNX Runtime maps into memory instead of parsing a copy: the fp32
SmolLM2 graph loads with a peak of ~0.5 GB instead of ~0.9 GB). The fingerprint hashes the graph
file, then the weights file when there is one; a single-file graph's fingerprint is its sha256, as
before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DATA_SUFFIX = ".data"


def data_file(onnx_path: Path) -> Path:
    """Where a graph's external weights live: ``<graph>.data`` beside it."""
    return onnx_path.with_name(onnx_path.name + DATA_SUFFIX)


def graph_fingerprint(onnx_path: Path, chunk: int = 1 << 22) -> str:
    """sha256 over the graph file and then its weights file, if it has one."""
    h = hashlib.sha256()
    _update(h, onnx_path, chunk)
    weights = data_file(onnx_path)
    if weights.exists():
        _update(h, weights, chunk)
    return h.hexdigest()


def graph_bytes(onnx_path: Path) -> int:
    """The graph's size on disk, its weights file included."""
    weights = data_file(onnx_path)
    return onnx_path.stat().st_size + (weights.stat().st_size if weights.exists() else 0)


def _update(h: hashlib._Hash, path: Path, chunk: int) -> None:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
