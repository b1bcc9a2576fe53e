"""Payload surgery for the wire tests: take a valid payload apart, edit it, frame it again.

A payload is ``b"STW1"``, the header length (uint32, little-endian), the JSON
header, then the blobs back to back (their sizes and CRCs in ``header["blobs"]``).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from typing import Any


def split(payload: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """A valid payload's header (as a dict) and its blobs."""
    n = struct.unpack_from("<I", payload, 4)[0]
    header = json.loads(payload[8 : 8 + n])
    blobs, off = [], 8 + n
    for size, _crc in header["blobs"]:
        blobs.append(payload[off : off + size])
        off += size
    return header, blobs


def header_bytes(header: dict[str, Any]) -> bytes:
    """The header as ``encode`` writes it (sorted keys, no spaces)."""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def frame(head: bytes, blobs: Sequence[bytes] = ()) -> bytes:
    """A payload from raw header bytes (no re-serialisation)."""
    return struct.pack("<4sI", b"STW1", len(head)) + head + b"".join(blobs)


def join(header: dict[str, Any], blobs: list[bytes], *, fix_table: bool = True) -> bytes:
    """A payload from a header and blobs: the blob table (lengths, CRCs) is recomputed unless ``fix_table`` is
    false, and the header length always is, so only the edit is wrong."""
    if fix_table:
        header = {**header, "blobs": [[len(b), zlib.crc32(b)] for b in blobs]}
    return frame(header_bytes(header), blobs)
