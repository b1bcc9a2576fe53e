"""Mutation fuzzing of ``schemas.decode``: whatever the bytes, a valid message or a WireError.

Starting from every test vector (``schemas.vectors.example_messages()``): cut
the payload at every offset, flip and overwrite random bytes, edit every field
of the JSON header (delete it, change its type, make numbers huge, negative,
fractional or NaN-strings, nest arrays deeply, add keys), and deliver it on
other devices' and other kinds' topics. ``decode`` must return a message or
raise :class:`schemas.WireError` -- never any other exception -- and must do it
fast (each case is timed). A message it accepts must encode again.
"""

from __future__ import annotations

import copy
import json
import random
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import KINDS, Message, WireError, decode, encode, topic
from schemas.vectors import DEVICE, example_messages
from tests.wire_helpers import frame, header_bytes, split

pytestmark = [pytest.mark.edge, pytest.mark.timeout(60)]

#: Longest a single decode may take (the largest vector is < 2 KB; headers are bounded at 4 MiB).
SLOW = 10.0  # seconds: catches a hang or a blow-up, not a slow day (speed belongs in benchmarks)

VECTORS: dict[str, tuple[str, bytes]] = {kind: encode(m) for kind, m in example_messages().items()}
ORIGINALS = example_messages()


class Outcome:
    def __init__(self) -> None:
        self.valid = 0
        self.rejected: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Outcome(valid={self.valid}, rejected={self.rejected})"


def check(t: Any, payload: Any, outcome: Outcome | None = None, *, case: str = "") -> Message | WireError:
    """Decode; fail the test on any exception but WireError, on a slow decode, or on a non-re-encodable result."""
    start = time.perf_counter()
    try:
        result: Message | WireError = decode(t, payload)
    except WireError as e:
        result = e
    except BaseException as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"decode raised {type(e).__name__}: {e!s:.300} for case {case!r}")
    elapsed = time.perf_counter() - start
    assert elapsed < SLOW, f"decode took {elapsed:.3f} s for case {case!r}"
    if isinstance(result, WireError):
        assert str(result), f"empty WireError text for case {case!r}"
        assert result.code in {"bad_topic", "bad_payload", "too_large", "bad_version", "bad_checksum", "invalid",
                               "foreign"}, result.code
        if outcome:
            outcome.rejected[result.code] = outcome.rejected.get(result.code, 0) + 1
    else:
        # accepted: it must be a well-formed message for this very topic, and encode again
        assert isinstance(result, Message)
        assert t == topic(result.device_id, result.KIND), case
        t2, p2 = encode(result)
        assert decode(t2, p2) == result
        if outcome:
            outcome.valid += 1
    return result


# --------------------------------------------------------------------------- sanity


@pytest.mark.parametrize("kind", list(VECTORS))
def test_vectors_decode(kind):
    t, p = VECTORS[kind]
    assert check(t, p, case=kind) == ORIGINALS[kind]


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("kind", list(VECTORS))
def test_every_truncation_is_rejected(kind):
    t, p = VECTORS[kind]
    step = max(1, len(p) // 3000)  # every offset for the vectors (all < 3 KB), a dense sample otherwise
    for cut in range(0, len(p), step):
        r = check(t, p[:cut], case=f"{kind}[:{cut}]")
        assert isinstance(r, WireError), f"{kind} cut at {cut} of {len(p)} decoded"
        assert r.code in {"bad_payload", "bad_checksum"}


@pytest.mark.parametrize("kind", list(VECTORS))
def test_every_extension_is_rejected(kind):
    t, p = VECTORS[kind]
    for extra in (b"\0", b"STW1", p):
        r = check(t, p + extra, case=f"{kind}+{len(extra)}")
        assert isinstance(r, WireError) and "truncated or padded" in str(r)


# --------------------------------------------------------------------------- byte flips


@pytest.mark.parametrize("kind", list(VECTORS))
def test_random_byte_corruption(kind):
    rng = random.Random(f"flip-{kind}")
    t, p = VECTORS[kind]
    head_end = 8 + struct.unpack_from("<I", p, 4)[0]
    outcome = Outcome()
    for i in range(500):
        bad = bytearray(p)
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            pos = rng.randrange(len(bad))
            if rng.random() < 0.5:
                bad[pos] ^= 1 << rng.randrange(8)
            else:
                bad[pos] = rng.randrange(256)
        r = check(t, bytes(bad), outcome, case=f"{kind} flip #{i}")
        if isinstance(r, Message) and bytes(bad) != p:
            # only a change inside the header can still decode (blobs are checksummed)
            changed = [j for j in range(len(p)) if bad[j] != p[j]]
            assert all(8 <= j < head_end for j in changed), changed
    assert outcome.rejected, outcome


WITH_BLOBS = [k for k, (_, p) in VECTORS.items() if split(p)[1]]


@pytest.mark.parametrize("kind", WITH_BLOBS)
def test_blob_corruption_always_fails_the_checksum(kind):
    rng = random.Random(f"blob-{kind}")
    t, p = VECTORS[kind]
    head_end = 8 + struct.unpack_from("<I", p, 4)[0]
    for _ in range(200):
        bad = bytearray(p)
        pos = rng.randrange(head_end, len(p))
        bad[pos] ^= 1 << rng.randrange(8)
        r = check(t, bytes(bad), case=f"{kind} blob flip at {pos}")
        assert isinstance(r, WireError) and r.code == "bad_checksum", r


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(list(VECTORS)), data=st.data())
def test_hypothesis_splices(kind, data):
    """Insert, delete or replace a slice anywhere with arbitrary bytes."""
    t, p = VECTORS[kind]
    a = data.draw(st.integers(0, len(p)))
    b = data.draw(st.integers(a, min(len(p), a + 64)))
    filler = data.draw(st.binary(max_size=64))
    check(t, p[:a] + filler + p[b:], case=f"{kind} splice {a}:{b} <- {filler!r}")


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=512), kind=st.sampled_from(KINDS))
def test_arbitrary_bytes(payload, kind):
    check(topic("dev-a", kind), payload, case=repr(payload[:40]))
    check(topic("dev-a", kind), b"STW1" + struct.pack("<I", len(payload)) + payload, case=repr(payload[:40]))


# --------------------------------------------------------------------------- header edits


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into a JSON tree (dict keys and list indexes), parents before children."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):  # long lists (keys): the first few stand for all
            yield (*prefix, i)
            yield from paths(v, (*prefix, i))


def get_parent(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path[:-1]:
        tree = tree[p]
    return tree


DEEP = "\x00DEEP\x00"
RAW_MARK = "\x00RAW:"

REPLACEMENTS: list[Any] = [
    None, True, False, 0, -1, 1.5, -0.0, 2**31, 2**63, 2**64 + 1, -(2**70), 10**100, 1e308,
    "", "x", "NaN", "Infinity", "-1", "1e999", "\u00e9" * 3, "\x00", "a" * 5000,
    [], {}, [None], [1, [2, [3]]], {"$tensor": {}}, {"$bytes": 0}, {"$bytes": -1}, {"$tensor": None},
    DEEP,  # an array nested 100,000 deep
    RAW_MARK + "NaN", RAW_MARK + "Infinity", RAW_MARK + "-Infinity",  # non-JSON constants
    RAW_MARK + "1e400", RAW_MARK + "-1e400",  # JSON numbers that parse to +-inf
    RAW_MARK + "9" * 5000,  # a number longer than Python converts
    RAW_MARK + "1" + "0" * 4000,
]


RAW = [r for r in REPLACEMENTS if isinstance(r, str) and r.startswith(RAW_MARK)]


def render(header: dict[str, Any]) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    if "\\u0000" in text:  # a marker (json.dumps escapes the NUL): splice in the raw text
        text = text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)
        for r in RAW:
            text = text.replace(json.dumps(r), r[len(RAW_MARK):])
    return text.encode()


def header_mutations(kind: str) -> Iterator[tuple[str, bytes]]:
    _, p = VECTORS[kind]
    header, blobs = split(p)
    for path in paths(header):
        for value in [*REPLACEMENTS, "<delete>", "<add-key>"]:
            h = copy.deepcopy(header)
            parent = get_parent(h, path)
            last = path[-1]
            if value == "<delete>":
                del parent[last]
            elif value == "<add-key>":
                if not isinstance(parent[last], dict):
                    continue
                parent[last]["zz_extra"] = 1
            else:
                parent[last] = value
            label = f"{kind} {'.'.join(map(str, path))} := {str(value)[:30]!r}"
            for fix_blobs in (False, True):
                if fix_blobs and path[0] == "blobs":
                    continue
                yield label + (" (blob table fixed)" if fix_blobs else ""), frame(render(h), blobs)


@pytest.mark.parametrize("kind", list(VECTORS))
def test_header_field_edits(kind):
    t, _ = VECTORS[kind]
    outcome = Outcome()
    n = 0
    for label, payload in header_mutations(kind):
        check(t, payload, outcome, case=label)
        n += 1
    assert n > 100 and outcome.rejected, outcome
    # nothing in the header can be NaN, infinite, or not-JSON and still decode
    assert outcome.rejected.get("invalid", 0) + outcome.rejected.get("bad_payload", 0) > n / 2, outcome


@pytest.mark.parametrize("kind", list(VECTORS))
def test_deeply_nested_arrays_are_rejected(kind):
    t, p = VECTORS[kind]
    header, blobs = split(p)
    for depth in (500, 5_000, 200_000):
        h = dict(header)
        h["body"] = dict(h["body"], device_id=DEEP)
        text = json.dumps(h, sort_keys=True, separators=(",", ":")).replace(
            json.dumps(DEEP), "[" * depth + "]" * depth)
        r = check(t, frame(text.encode(), blobs), case=f"{kind} depth {depth}")
        assert isinstance(r, WireError)


@pytest.mark.parametrize("kind", list(VECTORS))
def test_nan_strings_and_constants_in_numbers(kind):
    t, p = VECTORS[kind]
    header, blobs = split(p)
    numeric = [k for k, v in header["body"].items() if type(v) in (int, float)]
    assert numeric
    for field in numeric:
        for lit in ("NaN", "Infinity", "-Infinity", '"NaN"', '"inf"', "1e400", "-1e400", "1e-400"):
            h = copy.deepcopy(header)
            h["body"][field] = RAW_MARK + lit
            text = json.dumps(h, sort_keys=True, separators=(",", ":")).replace(json.dumps(RAW_MARK + lit), lit)
            r = check(t, frame(text.encode(), blobs), case=f"{kind}.{field}={lit}")
            if lit not in ("1e-400",):
                assert isinstance(r, WireError), f"{kind}.{field}={lit} decoded to {r!r}"


# --------------------------------------------------------------------------- topics


@pytest.mark.parametrize("kind", list(VECTORS))
def test_wrong_topics(kind):
    _, p = VECTORS[kind]
    for other_kind in KINDS:
        for device in (DEVICE, "dev-a", "board-77", "Board-7", "board"):
            t = topic(device, other_kind)
            r = check(t, p, case=f"{kind} on {t}")
            if other_kind != kind:
                assert isinstance(r, WireError) and r.code == "bad_topic", r
            elif device != DEVICE:
                assert isinstance(r, WireError) and r.code == "foreign", r
            else:
                assert r == ORIGINALS[kind]
    for t in ("", "sidetune/v1//jobs", "sidetune/v1/+/" + kind, "#", "sidetune/v1/board-7/" + kind + "/x",
              "sidetune/v1/board-7", None, b"sidetune/v1/board-7/jobs", 7, "\udcff"):
        r = check(t, p, case=f"{kind} on {t!r}")
        assert isinstance(r, WireError) and r.code == "bad_topic", r


@pytest.mark.parametrize("kind", list(VECTORS))
def test_mutated_payload_on_wrong_topic(kind):
    rng = random.Random(f"wt-{kind}")
    _, p = VECTORS[kind]
    for _ in range(100):
        bad = bytearray(p)
        bad[rng.randrange(len(bad))] = rng.randrange(256)
        check(topic("dev-b", rng.choice(KINDS)), bytes(bad), case=f"{kind} mutated on dev-b")


# --------------------------------------------------------------------------- decoded text must encode again


def test_lone_surrogate_in_text_is_rejected():
    """JSON can spell a lone surrogate (\\ud800); a text field must not accept it (it could not be encoded again)."""
    t, p = VECTORS["status"]
    header, blobs = split(p)
    header["body"]["agent_version"] = "\ud800"
    payload = frame(header_bytes(header), blobs)
    assert b"\\ud800" in payload
    r = check(t, payload, case="lone surrogate")
    assert isinstance(r, WireError) and "agent_version" in str(r), r


def test_crc_table_and_blob_sizes():
    """Claiming another size for a blob, with the sizes still summing right, is caught."""
    t, p = VECTORS["activations"]
    header, blobs = split(p)
    moved = [blobs[0][:-4], blobs[0][-4:] + blobs[1]]
    header["blobs"] = [[len(b), zlib.crc32(b)] for b in moved]
    r = check(t, frame(header_bytes(header), moved), case="moved")
    assert isinstance(r, WireError) and "bad tensor" in str(r)
