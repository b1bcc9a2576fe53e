"""Sample keys for the server's activation cache.

key = HMAC-SHA256(device secret, b"sidetune-key-v1\\0" + fingerprint + b"\\0" + pivot
                  + b"\\0" + token ids as little-endian int64)

The server cannot test a guessed text without the secret; the same sample on
the same backbone graph and pivot rule always gets the same key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np

KEY_DOMAIN = b"sidetune-key-v1\0"


def sample_key(secret: bytes, fingerprint: str, pivot: str, token_ids: Sequence[int]) -> str:
    """64 lowercase hex chars."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) == 0:
        raise ValueError("secret must be non-empty bytes")
    if not isinstance(fingerprint, str) or not fingerprint or "\0" in fingerprint:
        raise ValueError("fingerprint must be a non-empty string without NUL")
    if not isinstance(pivot, str) or not pivot or "\0" in pivot:
        raise ValueError("pivot must be a non-empty string without NUL")
    ids = np.asarray(list(token_ids))
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int64).max):
        raise ValueError("token ids must be non-negative int64 values")
    msg = (
        KEY_DOMAIN
        + fingerprint.encode("utf-8")
        + b"\0"
        + pivot.encode("utf-8")
        + b"\0"
        + ids.astype("<i8").tobytes()
    )
    return hmac.new(bytes(secret), msg, hashlib.sha256).hexdigest()
