"""Messages through ``encode``/``decode``: round trips, and every rejection the contract promises.

Each rejection is a :class:`schemas.WireError` (a ``ValueError``) whose text says
what is wrong and whose ``code`` is the machine-readable reason.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from schemas import (
    KINDS,
    MESSAGE_TYPES,
    ActivationBatch,
    AdapterUpdate,
    CacheReport,
    DeviceStatus,
    HyperParams,
    Job,
    Progress,
    Rejection,
    SideNetSpec,
    SidetuneError,
    WireError,
    WireTensor,
    decode,
    encode,
    encode_weights,
    expected_shapes,
    new_msg_id,
    topic,
)
from schemas.limits import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, MAX_TENSOR_ELEMENTS
from schemas.vectors import DEVICE, FINGERPRINT, SPEC, example_messages
from tests.wire_helpers import frame, header_bytes, join, split

#: Runs with the edge extra alone (no torch, no redis): the board's Python 3.10 CI step too.
pytestmark = pytest.mark.edge

# --------------------------------------------------------------------------- helpers: craft payloads


def reject(topic_: str, payload: Any, code: str, match: str) -> WireError:
    with pytest.raises(WireError, match=match) as e:
        decode(topic_, payload)
    assert e.value.code == code, (e.value.code, str(e.value))
    assert isinstance(e.value, ValueError)
    return e.value


def key(i: int) -> str:
    return hashlib.sha256(f"k{i}".encode()).hexdigest()


EXAMPLES = example_messages()


@pytest.fixture(params=list(EXAMPLES), ids=list(EXAMPLES))
def example(request) -> tuple[str, str, bytes]:
    kind = request.param
    t, p = encode(EXAMPLES[kind])
    return kind, t, p


# --------------------------------------------------------------------------- round trips


def test_every_kind_has_a_message_type_and_an_example():
    assert set(MESSAGE_TYPES) == set(KINDS) == set(EXAMPLES)
    for kind, cls in MESSAGE_TYPES.items():
        assert cls.KIND == kind
        assert type(EXAMPLES[kind]) is cls


def test_round_trip(example):
    kind, t, p = example
    assert t == topic(DEVICE, kind)
    m = decode(t, p)
    assert m == EXAMPLES[kind]
    assert type(m) is MESSAGE_TYPES[kind]
    assert encode(m) == (t, p)  # deterministic: encode(decode(p)) == p


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_decode_accepts_bytes_like(example, wrap):
    kind, t, p = example
    assert decode(t, wrap(p)) == EXAMPLES[kind]


def test_encode_is_deterministic_across_calls(example):
    kind, t, p = example
    assert encode(EXAMPLES[kind]) == (t, p)
    assert encode(example_messages()[kind]) == (t, p)


def _variants() -> list[Any]:
    rng = np.random.default_rng(1)
    spec = SideNetSpec(num_states=3, width=4, taps=(0,), out_dim=2, norm="none", activation="tanh", bottleneck=1)
    w = {n: rng.normal(size=s).astype(np.float32) for n, s in expected_shapes(spec).items()}
    common = {"device_id": "dev-a"}
    return [
        Job(**common, job_id="j", backbone_fingerprint=FINGERPRINT, spec=spec, keys=(key(0),),
            targets=WireTensor.from_array(np.zeros((1, 2)))),
        Job(**common, job_id="j.2_x-y", backbone_fingerprint=FINGERPRINT, spec=SPEC, base_adapter_version=7,
            hyper=HyperParams(epochs=1, lr=1.0, weight_decay=0, batch_size=1, val_fraction=0, seed=2**31 - 1),
            keys=tuple(key(i) for i in range(300)), targets=WireTensor.from_array(rng.normal(size=(300, 3)))),
        CacheReport(**common, job_id="j", total=0, missing=()),
        CacheReport(**common, job_id="j", total=3, missing=(key(0), key(1), key(2))),
        ActivationBatch(**common, job_id="j", backbone_fingerprint=FINGERPRINT, keys=(key(0),),
                        states=WireTensor.from_array(rng.normal(size=(1, 1, 1)), "float32")),
        ActivationBatch(**common, job_id="j", backbone_fingerprint=FINGERPRINT, keys=tuple(key(i) for i in range(16)),
                        states=WireTensor.from_array(rng.normal(size=(16, 31, 64)), "float16")),
        ActivationBatch(**common, job_id="j", backbone_fingerprint=FINGERPRINT, keys=(key(0), key(1)),
                        states=WireTensor.from_array(np.zeros((2, 3, 4)), "int8")),
        Progress(**common, job_id="j", state="waiting"),
        Progress(**common, job_id="j", state="failed", detail="ü" * 2000, train_loss=0.0, val_loss=1e300),
        AdapterUpdate(**common, job_id="j", version=1, backbone_fingerprint=FINGERPRINT, spec=spec,
                      weights=encode_weights(w, spec)),
        AdapterUpdate(**common, job_id="j", version=99, base_version=98, backbone_fingerprint=FINGERPRINT, spec=spec,
                      weights=encode_weights(w, spec), metrics={f"m{i}": float(i) / 3 for i in range(64)}),
        Rejection(**common, ref_topic="", code="internal", reason=""),
        Rejection(**common, ref_topic="x" * 256, ref_msg_id=new_msg_id(), code="too_large", reason="r" * 2000),
        DeviceStatus(**common, state="offline", agent_version=""),
        DeviceStatus(**common, state="online", agent_version="v" * 64, adapter_version=3,
                     backbone_fingerprint=FINGERPRINT, sent_at=0.0),
    ]


@pytest.mark.parametrize("message", _variants(), ids=lambda m: m.KIND)
def test_round_trip_variants(message):
    t, p = encode(message)
    assert t == topic("dev-a", message.KIND)
    m = decode(t, p)
    assert m == message
    assert encode(m) == (t, p)


def test_defaults_are_filled_in():
    m = Progress(device_id="dev-a", job_id="j", state="done")
    assert m.v == 1 and len(m.msg_id) == 32 and m.sent_at > 1.6e9
    assert m.msg_id != Progress(device_id="dev-a", job_id="j", state="done").msg_id


def test_tensor_values_survive(example):
    kind, t, p = example
    m = decode(t, p)
    for name in ("targets", "states"):
        if hasattr(m, name):
            np.testing.assert_array_equal(getattr(m, name).to_array(), getattr(EXAMPLES[kind], name).to_array())


def test_messages_are_frozen():
    with pytest.raises(ValidationError):
        EXAMPLES["progress"].epoch = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- the error type


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)
    assert issubclass(WireError, SidetuneError)
    assert WireError("x").code == "invalid"


# --------------------------------------------------------------------------- framing


def test_empty_payload(example):
    _, t, _ = example
    reject(t, b"", "bad_payload", r"payload is truncated \(0 bytes, not even a header\)")


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_payload_shorter_than_the_prefix(example, cut):
    _, t, p = example
    reject(t, p[:cut], "bad_payload", rf"payload is truncated \({cut} bytes")


def test_payload_cut_inside_the_header(example):
    _, t, p = example
    reject(t, p[:40], "bad_payload", r"payload is truncated: header needs \d+ bytes, 32 left")


def test_payload_cut_inside_the_blobs():
    t, p = encode(EXAMPLES["adapter"])
    reject(t, p[:-1], "bad_payload", rf"payload length {len(p) - 1} does not match its header \({len(p)} expected\): "
           "truncated or padded")


def test_payload_with_trailing_bytes(example):
    _, t, p = example
    reject(t, p + b"\0", "bad_payload", "truncated or padded")


def test_bad_magic(example):
    _, t, p = example
    reject(t, b"STW2" + p[4:], "bad_payload", r"does not start with b'STW1' \(got b'STW2'\): not a sidetune v1 message")
    reject(t, b"{" + p[1:], "bad_payload", "does not start with b'STW1'")


@pytest.mark.parametrize("kind", ["jobs", "activations", "adapter"])
def test_corrupted_blob_fails_its_checksum(kind):
    t, p = encode(EXAMPLES[kind])
    for pos in (len(p) - 1, len(p) - 20):
        bad = bytearray(p)
        bad[pos] ^= 0x40
        reject(t, bytes(bad), "bad_checksum", r"blob \d fails its checksum: corrupted in transit")


def test_corrupted_header_json(example):
    _, t, p = example
    bad = bytearray(p)
    bad[8] = ord("[")  # the header's opening brace
    reject(t, bytes(bad), "bad_payload", "header")
    bad[8] = 0xFF
    reject(t, bytes(bad), "bad_payload", r"header is not UTF-8 \(invalid start byte at byte 0\)")
    bad = bytearray(p)
    bad[9] = ord("!")
    reject(t, bytes(bad), "bad_payload", r"header is not valid JSON \(.* at position 1\)")


def test_header_not_an_object(example):
    _, t, _ = example
    reject(t, frame(b"[1,2]"), "bad_payload", "header must be a JSON object")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_header_non_json_numbers(constant):
    t, p = encode(EXAMPLES["progress"])
    header, blobs = split(p)
    head = header_bytes(header)
    head = head.replace(b'"train_loss":0.25', b'"train_loss":' + constant.encode())
    reject(t, frame(head, blobs), "bad_payload", f"non-JSON number {constant}")


def test_header_fields_are_fixed(example):
    _, t, p = example
    header, blobs = split(p)
    reject(t, join({**header, "extra": 1}, blobs), "bad_payload", r"header fields must be blobs, body, kind, v; got "
           r"\['blobs', 'body', 'extra', 'kind', 'v'\]")
    del header["blobs"]
    reject(t, join(header, [], fix_table=False), "bad_payload", "header fields must be blobs, body, kind, v")


def test_body_must_be_an_object():
    t, p = encode(EXAMPLES["cache"])
    header, blobs = split(p)
    reject(t, join({**header, "body": [1]}, blobs), "bad_payload", "header body must be an object")


def test_blob_table_must_be_pairs():
    t, p = encode(EXAMPLES["jobs"])
    header, blobs = split(p)
    for table in ([[48]], [[48, -1]], [["48", 0]], [[48.0, 0]], {"0": [48, 0]}, [[True, 0]]):
        reject(t, join({**header, "blobs": table}, blobs, fix_table=False), "bad_payload",
               r"header blobs must be a list of \[nbytes, crc32\] pairs")


def test_blob_references():
    t, p = encode(EXAMPLES["jobs"])
    header, blobs = split(p)
    reject(t, join(header, blobs + [b"spare"]), "bad_payload", "payload carries blobs that no field uses")
    header["body"]["targets"]["$tensor"]["data"] = 3
    reject(t, join(header, blobs), "bad_payload", "blob reference 3 is out of range")
    header["body"]["targets"]["$tensor"]["data"] = "0"
    reject(t, join(header, blobs), "bad_payload", "blob reference 0 is out of range")


def test_blob_referenced_twice():
    t, p = encode(EXAMPLES["activations"])
    header, blobs = split(p)
    header["body"]["states"]["$tensor"]["scale"] = 0
    reject(t, join(header, blobs), "bad_payload", "blob 0 is referenced twice")


def test_tensor_descriptor_fields_are_fixed():
    t, p = encode(EXAMPLES["activations"])
    header, blobs = split(p)
    header["body"]["states"]["$tensor"]["order"] = "C"
    reject(t, join(header, blobs), "bad_payload", "a \\$tensor descriptor holds exactly data, dtype, scale, shape")
    header, blobs = split(p)
    header["body"]["states"]["extra"] = 1
    reject(t, join(header, blobs), "bad_payload", "a \\$tensor descriptor holds exactly")
    header, blobs = split(p)
    header["body"]["states"]["$tensor"]["shape"] = [2, 5, "8"]
    reject(t, join(header, blobs), "bad_payload", "tensor shape must be a list of integers")


def test_bytes_reference_has_no_other_fields():
    t, p = encode(EXAMPLES["adapter"])
    header, blobs = split(p)
    header["body"]["weights"]["format"] = "safetensors"
    reject(t, join(header, blobs), "bad_payload", "a \\$bytes reference has no other fields")


# --------------------------------------------------------------------------- version


@pytest.mark.parametrize("v", [2, 0, -1, "1", 1.0, True, None, [1]])
def test_unknown_schema_version(example, v):
    _, t, p = example
    header, blobs = split(p)
    e = reject(t, join({**header, "v": v}, blobs), "bad_version",
               r"unknown schema version .*; this build speaks 1")
    assert repr(v) in str(e)


def test_missing_schema_version(example):
    _, t, p = example
    header, blobs = split(p)
    del header["v"]
    reject(t, join(header, blobs), "bad_version", "unknown schema version None")


def test_body_schema_version(example):
    _, t, p = example
    header, blobs = split(p)
    header["body"]["v"] = 2
    reject(t, join(header, blobs), "invalid", r"invalid \w+ message: v: Input should be 1")


# --------------------------------------------------------------------------- kind and topic


def test_unknown_kind_in_header():
    t, p = encode(EXAMPLES["status"])
    header, blobs = split(p)
    reject(t, join({**header, "kind": "weights"}, blobs), "bad_payload", "unknown message kind 'weights'")


def test_message_on_another_kinds_topic(example):
    kind, _, p = example
    for other in KINDS:
        if other != kind:
            reject(topic(DEVICE, other), p, "bad_topic", f"a {kind} message cannot arrive on the {other} topic")


def test_message_on_another_devices_topic(example):
    kind, _, p = example
    reject(topic("dev-a", kind), p, "foreign", "message for device 'board-7' arrived on device 'dev-a''s topic")


@pytest.mark.parametrize("bad", ["", "sidetune/v1/board-7", "sidetune/v1/+/jobs", "sidetune/v2/board-7/jobs", None])
def test_malformed_topic(example, bad):
    _, _, p = example
    reject(bad, p, "bad_topic", "topic|bad device id")


@pytest.mark.parametrize("payload", ["STW1", None, 12, [1, 2], {"v": 1}, np.zeros(4, np.uint8)])
def test_payload_must_be_bytes(example, payload):
    _, t, _ = example
    reject(t, payload, "bad_payload", rf"payload must be bytes, not {type(payload).__name__}")


# --------------------------------------------------------------------------- size limits


def test_oversized_payload_is_rejected_before_parsing():
    t = topic(DEVICE, "activations")
    reject(t, b"STW1" + b"\0" * (MAX_PAYLOAD_BYTES - 3), "too_large",
           rf"payload is {MAX_PAYLOAD_BYTES + 1} bytes, over the {MAX_PAYLOAD_BYTES} limit")


def test_oversized_header_is_rejected_before_reading_it():
    t = topic(DEVICE, "jobs")
    prefix = struct.pack("<4sI", b"STW1", MAX_HEADER_BYTES + 1)
    reject(t, prefix, "too_large", rf"header length {MAX_HEADER_BYTES + 1} exceeds the {MAX_HEADER_BYTES} limit")
    reject(t, prefix + b" " * (MAX_HEADER_BYTES + 1), "too_large", "exceeds the")
    reject(t, struct.pack("<4sI", b"STW1", 2**32 - 1), "too_large", "exceeds the")


def test_largest_header_is_read():
    """A header of exactly MAX_HEADER_BYTES is parsed (and then judged on its content)."""
    t, p = encode(EXAMPLES["progress"])
    header, blobs = split(p)
    head = header_bytes(header)
    head = head + b" " * (MAX_HEADER_BYTES - len(head))
    assert decode(t, frame(head)) == EXAMPLES["progress"]


def test_encode_refuses_a_payload_over_the_limit():
    x = WireTensor(dtype="float32", shape=(4, 1024, 1024), data=np.ones(MAX_TENSOR_ELEMENTS, "<f4").tobytes())
    m = ActivationBatch(device_id="dev-a", job_id="j", backbone_fingerprint=FINGERPRINT,
                        keys=tuple(key(i) for i in range(4)), states=x)
    with pytest.raises(WireError, match=rf"activations payload is \d+ bytes, over the {MAX_PAYLOAD_BYTES} limit: "
                       "send smaller batches") as e:
        encode(m)
    assert e.value.code == "too_large"


def test_text_limits():
    t, p = encode(EXAMPLES["errors"])
    header, blobs = split(p)
    header["body"]["reason"] = "r" * 2001
    reject(t, join(header, blobs), "invalid", "reason: String should have at most 2000 characters")


def test_encode_refuses_non_messages():
    for thing in (None, {"kind": "jobs"}, EXAMPLES["jobs"].spec, EXAMPLES["jobs"].targets):
        with pytest.raises(WireError, match="not a sidetune message"):
            encode(thing)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fields


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_unknown_body_field(kind):
    t, p = encode(EXAMPLES[kind])
    header, blobs = split(p)
    header["body"]["color"] = "red"
    reject(t, join(header, blobs), "invalid", rf"invalid {kind} message: color: Extra inputs are not permitted")


def test_unknown_nested_field():
    t, p = encode(EXAMPLES["jobs"])
    header, blobs = split(p)
    header["body"]["spec"]["dropout"] = 0.1
    reject(t, join(header, blobs), "invalid", "spec.dropout: Extra inputs are not permitted")
    header, blobs = split(p)
    header["body"]["hyper"]["momentum"] = 0.9
    reject(t, join(header, blobs), "invalid", "hyper.momentum: Extra inputs are not permitted")


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_missing_required_field(kind):
    t, p = encode(EXAMPLES[kind])
    header, blobs = split(p)
    del header["body"]["device_id"]
    reject(t, join(header, blobs), "invalid", rf"invalid {kind} message: device_id: Field required")


@pytest.mark.parametrize("field,value,match", [
    ("msg_id", "XYZ", "msg_id: String should match pattern"),
    ("sent_at", -1, "sent_at: Input should be greater than or equal to 0"),
    ("sent_at", "soon", "sent_at: Input should be a valid number"),
    ("epoch", 1001, "epoch: Input should be less than or equal to 1000"),
    ("state", "exploded", "state: Input should be"),
    ("train_loss", -0.5, "train_loss: Input should be greater than or equal to 0"),
    ("job_id", "", "job_id: String should match pattern"),
    ("device_id", "dev/a", "device_id: String should match pattern"),
])
def test_bad_field_values(field, value, match):
    t, p = encode(EXAMPLES["progress"])
    header, blobs = split(p)
    header["body"][field] = value
    reject(t, join(header, blobs), "invalid", rf"invalid progress message: {match}")


def test_error_text_lists_at_most_three_problems():
    t, p = encode(EXAMPLES["progress"])
    header, blobs = split(p)
    for f in ("a1", "a2", "a3", "a4", "a5"):
        header["body"][f] = 1
    reject(t, join(header, blobs), "invalid", r"\(\+2 more\)$")


def test_duplicate_keys():
    t, p = encode(EXAMPLES["jobs"])
    header, blobs = split(p)
    header["body"]["keys"][1] = header["body"]["keys"][0]
    reject(t, join(header, blobs), "invalid", "job keys must be unique")
    t, p = encode(EXAMPLES["activations"])
    header, blobs = split(p)
    header["body"]["keys"][1] = header["body"]["keys"][0]
    reject(t, join(header, blobs), "invalid", "batch keys must be unique")


def test_cache_report_cannot_miss_more_than_the_job_holds():
    t, p = encode(EXAMPLES["cache"])
    header, blobs = split(p)
    header["body"]["total"] = 1
    reject(t, join(header, blobs), "invalid", "more keys missing than the job holds")


# --------------------------------------------------------------------------- tensors in messages


def test_wrong_dtype_for_targets():
    t, p = encode(EXAMPLES["jobs"])
    header, blobs = split(p)
    header["body"]["targets"]["$tensor"]["dtype"] = "float16"
    x = np.frombuffer(blobs[0], "<f4").astype("<f2").tobytes()
    reject(t, join(header, [x]), "invalid", "targets travel as float32, not float16")


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "", 4, None])
def test_unknown_dtype(dtype):
    t, p = encode(EXAMPLES["jobs"])
    header, blobs = split(p)
    header["body"]["targets"]["$tensor"]["dtype"] = dtype
    reject(t, join(header, blobs), "invalid", r"bad tensor [a-z_.]+: dtype: Input should be 'float32', 'float16' or 'int8'")


def test_states_rows_must_match_keys():
    t, p = encode(EXAMPLES["activations"])
    header, blobs = split(p)
    header["body"]["keys"].append(key(99))
    reject(t, join(header, blobs), "invalid",
           r"states must have shape \[3, L\+1, d\] \(one row per key\), got \[2, 5, 8\]")


def test_states_must_be_three_dimensional():
    m = EXAMPLES["activations"]
    t, p = encode(m.model_copy(update={"states": WireTensor.from_array(m.states.to_array())}))
    header, blobs = split(p)
    header["body"]["states"]["$tensor"]["shape"] = [2, 40]
    reject(t, join(header, blobs), "invalid", r"states must have shape \[2, L\+1, d\] \(one row per key\), got \[2, 40\]")


def test_targets_must_match_keys_and_out_dim():
    t, p = encode(EXAMPLES["jobs"])
    header, blobs = split(p)
    header["body"]["spec"]["out_dim"] = 4
    reject(t, join(header, blobs), "invalid",
           r"targets must have shape \[4, 4\] \(keys × out_dim\), got \[4, 3\]")
    header, blobs = split(p)
    header["body"]["targets"]["$tensor"]["shape"] = [3, 4]
    reject(t, join(header, blobs), "invalid", r"targets must have shape \[4, 3\] \(keys × out_dim\), got \[3, 4\]")


def test_tensor_bytes_must_match_its_shape():
    t, p = encode(EXAMPLES["jobs"])
    header, blobs = split(p)
    header["body"]["targets"]["$tensor"]["shape"] = [4, 4]
    reject(t, join(header, blobs), "invalid", r"bad tensor [a-z_.]+: .*float32 tensor of shape \[4, 4\] needs 64 bytes, got 48")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_in_targets(bad):
    t, p = encode(EXAMPLES["jobs"])
    header, blobs = split(p)
    x = np.frombuffer(blobs[0], "<f4").copy()
    x[5] = bad
    reject(t, join(header, [x.tobytes()]), "invalid", "bad tensor [a-z_.]+: .*tensor holds NaN or infinite values")


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1.0])
def test_bad_int8_scales_in_activations(bad):
    t, p = encode(EXAMPLES["activations"])
    header, blobs = split(p)
    s = np.frombuffer(blobs[1], "<f4").copy()
    s[3] = bad
    reject(t, join(header, [blobs[0], s.tobytes()]), "invalid", "int8 scales must be finite and positive")


def test_fp16_inf_in_activations():
    m = EXAMPLES["activations"]
    states = WireTensor.from_array(m.states.to_array(), "float16")
    t, p = encode(m.model_copy(update={"states": states}))
    header, blobs = split(p)
    x = np.frombuffer(blobs[0], "<f2").copy()
    x[0] = np.inf
    reject(t, join(header, [x.tobytes()]), "invalid", "tensor holds NaN or infinite values")


def test_int8_scale_that_overflows_is_rejected():
    t, p = encode(EXAMPLES["activations"])
    header, blobs = split(p)
    s = np.full(10, 1e37, "<f4")
    q = np.full(80, 127, np.int8)
    payload = join(header, [q.tobytes(), s.tobytes()])
    try:
        m = decode(t, payload)
    except WireError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.all(np.isfinite(m.states.to_array()))


def test_int8_states_dequantise():
    m = decode(*encode(EXAMPLES["activations"]))
    x = m.states.to_array()
    assert x.shape == (2, 5, 8) and x.dtype == np.float32 and np.all(np.isfinite(x))


# --------------------------------------------------------------------------- adapter weights


def test_adapter_weights_for_another_spec():
    t, p = encode(EXAMPLES["adapter"])
    header, blobs = split(p)
    header["body"]["spec"]["out_dim"] = 4
    reject(t, join(header, blobs), "invalid", r"weight out.weight has shape \[3, 8\], expected \[4, 8\]")
    header, blobs = split(p)
    header["body"]["spec"]["taps"] = [1, 2, 4]
    reject(t, join(header, blobs), "invalid", r"weights do not match the spec: missing \['ladder.2.")


def test_adapter_weights_missing_or_extra_tensor():
    rng = np.random.default_rng(0)
    w = {n: rng.normal(size=s).astype(np.float32) for n, s in expected_shapes(SPEC).items()}
    t, p = encode(EXAMPLES["adapter"])
    header, _ = split(p)
    from safetensors.numpy import save

    missing = dict(w)
    del missing["out.bias"]
    reject(t, join(header, [save(missing)]), "invalid", r"missing \['out.bias'\], unexpected \[\]")
    reject(t, join(header, [save({**w, "extra": np.zeros(1, np.float32)})]), "invalid",
           r"missing \[\], unexpected \['extra'\]")
    reject(t, join(header, [save({**w, "out.bias": w["out.bias"].astype(np.float16)})]), "invalid",
           "weight out.bias is float16, expected float32")
    nan = dict(w)
    nan["out.bias"] = np.array([0, np.nan, 0], np.float32)
    reject(t, join(header, [save(nan)]), "invalid", "weight out.bias holds NaN or infinite values")


@pytest.mark.parametrize("blob", [b"", b"1234567", b"not a safetensors file at all", b"\xff" * 64])
def test_adapter_weights_not_safetensors(blob):
    t, p = encode(EXAMPLES["adapter"])
    header, _ = split(p)
    reject(t, join(header, [blob]), "invalid", "weights are not a (valid )?safetensors file")


def test_adapter_weights_must_be_a_blob():
    t, p = encode(EXAMPLES["adapter"])
    header, blobs = split(p)
    header["body"]["weights"] = 12
    reject(t, join(header, []), "invalid", "weights: Input should be a valid bytes")


def test_adapter_built_with_mismatched_weights_is_refused_at_construction():
    other = SideNetSpec(num_states=5, width=8, taps=(2, 4), bottleneck=2, out_dim=4)
    with pytest.raises(ValidationError, match="weight out.weight has shape"):
        AdapterUpdate(device_id="dev-a", job_id="j", version=1, backbone_fingerprint=FINGERPRINT, spec=other,
                      weights=EXAMPLES["adapter"].weights)


@pytest.mark.parametrize("metric,value,match", [
    ("Bad-Name", 1.0, "metrics.Bad-Name.\\[key\\]: String should match pattern"),
    ("loss", "NaN", "metrics.loss: Input should be a finite number"),
    ("loss", "inf", "metrics.loss: Input should be a finite number"),
])
def test_adapter_metrics(metric, value, match):
    t, p = encode(EXAMPLES["adapter"])
    header, blobs = split(p)
    header["body"]["metrics"] = {metric: value}
    reject(t, join(header, blobs), "invalid", match)
