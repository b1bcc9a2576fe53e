"""``encode(message) -> (topic, payload)`` and ``decode(topic, payload) -> message``.

Payload layout (all integers little-endian)::

    b"STW1" | u32 header length | header (canonical JSON, UTF-8) | blob 0 | blob 1 | ...

The header is ``{"blobs": [[nbytes, crc32], ...], "body": {...}, "kind": ..., "v": 1}``
with sorted keys and no spaces, so encoding is deterministic. In the body a
tensor is ``{"$tensor": {"dtype", "shape", "data": i, "scale": j | null}}`` and
raw bytes (adapter weights) are ``{"$bytes": i}``, ``i`` indexing the blobs.
No pickle anywhere; every failure of :func:`decode` is a :class:`WireError`.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.activations import ActivationBatch
from schemas.adapter import AdapterUpdate
from schemas.base import Message
from schemas.errors import WireError
from schemas.jobs import CacheReport, Job
from schemas.limits import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, SCHEMA_VERSION
from schemas.progress import Progress
from schemas.status import DeviceStatus, Rejection
from schemas.tensors import WireTensor
from schemas.topics import Topic
from schemas.updates import WeightUpdate

MAGIC = b"STW1"
_MSG_ID = re.compile(r"[0-9a-f]{8,64}")
_PREFIX = struct.Struct("<4sI")

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls for cls in (Job, CacheReport, ActivationBatch, Progress, AdapterUpdate, Rejection, DeviceStatus,
                              WeightUpdate)
}


# --------------------------------------------------------------------------- encode


def encode(message: Message) -> tuple[str, bytes]:
    """The topic and payload bytes of ``message``; deterministic."""
    if not isinstance(message, Message) or type(message) not in MESSAGE_TYPES.values():
        raise WireError(f"cannot encode {type(message).__name__}: not a sidetune message", code="invalid")
    blobs: list[bytes] = []
    body = _to_wire(message, blobs)
    header = {
        "blobs": [[len(b), zlib.crc32(b)] for b in blobs],
        "body": body,
        "kind": message.KIND,
        "v": SCHEMA_VERSION,
    }
    try:
        head = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    except ValueError as e:
        raise WireError(f"cannot encode {message.KIND}: {e}", code="invalid") from None
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"{message.KIND} header is {len(head)} bytes, over the {MAX_HEADER_BYTES} limit", code="too_large")
    payload = b"".join([_PREFIX.pack(MAGIC, len(head)), head, *blobs])
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(
            f"{message.KIND} payload is {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES} limit: send smaller batches",
            code="too_large",
        )
    return str(Topic(message.device_id, message.KIND)), payload


def _to_wire(value: Any, blobs: list[bytes]) -> Any:
    if isinstance(value, WireTensor):
        data = len(blobs)
        blobs.append(value.data)
        scale = None
        if value.scale is not None:
            scale = len(blobs)
            blobs.append(value.scale)
        return {"$tensor": {"data": data, "dtype": value.dtype, "scale": scale, "shape": list(value.shape)}}
    if isinstance(value, BaseModel):
        return {name: _to_wire(getattr(value, name), blobs) for name in type(value).model_fields}
    if isinstance(value, bytes):
        blobs.append(value)
        return {"$bytes": len(blobs) - 1}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v, blobs) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_wire(v, blobs) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- decode


def decode(topic: str, payload: bytes | bytearray | memoryview) -> Message:
    """Parse and validate one payload received on ``topic``.

    Raises :class:`WireError` (never anything else) for any bad input.
    """
    try:
        return _decode(topic, payload)
    except WireError:
        raise
    except RecursionError:
        raise WireError("payload header is nested too deeply", code="bad_payload") from None
    except Exception as e:  # last line of defence: the contract promises WireError only
        raise WireError(f"malformed payload ({type(e).__name__}: {e})", code="bad_payload") from None


def _decode(topic: str, payload: bytes | bytearray | memoryview) -> Message:
    where = Topic.parse(topic)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError(f"payload must be bytes, not {type(payload).__name__}", code="bad_payload")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload is {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES} limit", code="too_large")
    if len(payload) < _PREFIX.size:
        raise WireError(f"payload is truncated ({len(payload)} bytes, not even a header)", code="bad_payload")
    magic, head_len = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise WireError(f"payload does not start with {MAGIC!r} (got {magic!r}): not a sidetune v1 message", code="bad_payload")
    if head_len > MAX_HEADER_BYTES:
        raise WireError(f"header length {head_len} exceeds the {MAX_HEADER_BYTES} limit", code="too_large")
    if _PREFIX.size + head_len > len(payload):
        raise WireError(f"payload is truncated: header needs {head_len} bytes, {len(payload) - _PREFIX.size} left", code="bad_payload")
    header = _parse_header(payload[_PREFIX.size : _PREFIX.size + head_len])
    try:
        return _decode_header(where, header, payload, _PREFIX.size + head_len)
    except WireError as e:
        body = header.get("body")
        msg_id = body.get("msg_id") if isinstance(body, dict) else None
        if isinstance(msg_id, str) and _MSG_ID.fullmatch(msg_id):
            e.msg_id = msg_id  # so the rejection can name the message
        raise


def _decode_header(where: Topic, header: dict[str, Any], payload: bytes, start: int) -> Message:
    version = header.get("v")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise WireError(f"unknown schema version {version!r}; this build speaks {SCHEMA_VERSION}", code="bad_version")
    if set(header) != {"blobs", "body", "kind", "v"}:
        raise WireError(f"header fields must be blobs, body, kind, v; got {sorted(header)[:10]}", code="bad_payload")
    kind = header["kind"]
    if kind not in MESSAGE_TYPES:
        raise WireError(f"unknown message kind {str(kind)[:40]!r}", code="bad_payload")
    if kind != where.kind:
        raise WireError(f"a {kind} message cannot arrive on the {where.kind} topic", code="bad_topic")

    blobs = _split_blobs(header["blobs"], payload, start)
    body = header["body"]
    if not isinstance(body, dict):
        raise WireError("header body must be an object", code="bad_payload")
    used: set[int] = set()
    resolved = _from_wire(body, blobs, used, "")
    if used != set(range(len(blobs))):
        raise WireError("payload carries blobs that no field uses", code="bad_payload")

    cls = MESSAGE_TYPES[kind]
    try:
        message = cls.model_validate(resolved)
    except ValidationError as e:
        raise WireError(f"invalid {kind} message: {_describe(e)}", code="invalid") from None
    if message.device_id != where.device_id:
        raise WireError(
            f"message for device {message.device_id!r} arrived on device {where.device_id!r}'s topic",
            code="foreign",
        )
    return message


def _reject_constant(name: str) -> Any:
    raise WireError(f"header holds the non-JSON number {name}", code="bad_payload")


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"header is not UTF-8 ({e.reason} at byte {e.start})", code="bad_payload") from None
    try:
        header = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise WireError(f"header is not valid JSON ({e.msg} at position {e.pos})", code="bad_payload") from None
    except ValueError as e:  # e.g. an integer too long to convert
        raise WireError(f"header is not valid JSON ({e})", code="bad_payload") from None
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object", code="bad_payload")
    return header


def _split_blobs(table: Any, payload: bytes, start: int) -> list[bytes]:
    if not isinstance(table, list) or not all(
        isinstance(b, list) and len(b) == 2 and all(type(x) is int and x >= 0 for x in b) for b in table
    ):
        raise WireError("header blobs must be a list of [nbytes, crc32] pairs", code="bad_payload")
    total = sum(n for n, _ in table)
    if start + total != len(payload):
        raise WireError(
            f"payload length {len(payload)} does not match its header ({start + total} expected): truncated or padded",
            code="bad_payload",
        )
    blobs = []
    for i, (n, crc) in enumerate(table):
        blob = payload[start : start + n]
        if zlib.crc32(blob) != crc:
            raise WireError(f"blob {i} fails its checksum: corrupted in transit", code="bad_checksum")
        blobs.append(blob)
        start += n
    return blobs


def _blob(ref: Any, blobs: list[bytes], used: set[int]) -> bytes:
    if type(ref) is not int or not 0 <= ref < len(blobs):
        raise WireError(f"blob reference {str(ref)[:20]} is out of range", code="bad_payload")
    if ref in used:
        raise WireError(f"blob {ref} is referenced twice", code="bad_payload")
    used.add(ref)
    return blobs[ref]


def _from_wire(value: Any, blobs: list[bytes], used: set[int], path: str) -> Any:
    if isinstance(value, dict):
        if "$tensor" in value:
            return _tensor(value, blobs, used, path or "message")
        if "$bytes" in value:
            if len(value) != 1:
                raise WireError("a $bytes reference has no other fields", code="bad_payload")
            return _blob(value["$bytes"], blobs, used)
        return {k: _from_wire(v, blobs, used, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_wire(v, blobs, used, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _tensor(value: dict[str, Any], blobs: list[bytes], used: set[int], path: str) -> WireTensor:
    desc = value["$tensor"]
    if len(value) != 1 or not isinstance(desc, dict) or set(desc) != {"data", "dtype", "scale", "shape"}:
        raise WireError("a $tensor descriptor holds exactly data, dtype, scale, shape", code="bad_payload")
    shape = desc["shape"]
    if not isinstance(shape, list) or not all(type(n) is int for n in shape):
        raise WireError("tensor shape must be a list of integers", code="bad_payload")
    data = _blob(desc["data"], blobs, used)
    scale = None if desc["scale"] is None else _blob(desc["scale"], blobs, used)
    try:
        return WireTensor(dtype=desc["dtype"], shape=tuple(shape), data=data, scale=scale)
    except ValidationError as e:
        reasons = "; ".join(
            (f"{'.'.join(map(str, err['loc']))}: " if err["loc"] else "") + str(err["msg"]).removeprefix("Value error, ")
            for err in e.errors()[:3]
        )
        raise WireError(f"bad tensor {path[:80]}: {reasons}", code="invalid") from None


def _describe(e: ValidationError, most: int = 3) -> str:
    parts = []
    for err in e.errors()[:most]:
        loc = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{loc}: {err['msg']}")
    more = e.error_count() - most
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
