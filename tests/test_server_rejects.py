"""Bad input against a running worker: every bad message is answered on ``errors``, and the worker goes on.

A raw paho client logged in as the device publishes each bad message on the
device's own uplink topics (the broker's ACL allows nothing else) and reads the
device's downlinks; a real worker, Redis and mosquitto do the rest.
"""

from __future__ import annotations

import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from schemas import (
    Job,
    Progress,
    Rejection,
    encode,
    topic,
)
from side_server.worker import Worker
from tests.loop_helpers import SPEC, Device, make_batch, make_job, worker_and_device
from tests.wire_helpers import join, split

pytestmark = pytest.mark.integration

MAX_AGE = 600.0


@pytest.fixture
def server_and_device(mosquitto, redis_url, broker_accounts, mqtt_client, device_account) -> Iterator[tuple[Worker, Device]]:
    """A worker in its own share group, and a device client already answered once (the worker is subscribed)."""
    with worker_and_device(mosquitto, redis_url, broker_accounts, mqtt_client, device_account, "rej",
                           max_message_age=MAX_AGE) as (worker, dev):
        yield worker, dev


# --------------------------------------------------------------------------- the bad messages


@dataclass(frozen=True)
class Bad:
    """One bad message: built from the device id and a job the server already holds."""

    build: Callable[[str, Job], tuple[str, bytes, str | None]]  # -> topic, payload, msg id the rejection names
    code: str
    reason: str  # a regular expression the reason must match (what is wrong, in words)


def _framed(dev: str, known: Job) -> tuple[str, bytes]:
    return encode(make_job(dev))


def _edit(edit: Callable[[dict, list[bytes]], None]) -> Callable[[str, Job], tuple[str, bytes, None]]:
    def build(dev: str, known: Job) -> tuple[str, bytes, None]:
        t, payload = _framed(dev, known)
        header, blobs = split(payload)
        edit(header, blobs)
        return t, join(header, blobs), None

    return build


def _truncated(dev: str, known: Job) -> tuple[str, bytes, None]:
    t, payload = _framed(dev, known)
    return t, payload[: len(payload) - 7], None


def _random(dev: str, known: Job) -> tuple[str, bytes, None]:
    return topic(dev, "jobs"), b"\x00" + os.urandom(300), None


def _magic(dev: str, known: Job) -> tuple[str, bytes, None]:
    t, payload = _framed(dev, known)
    return t, b"STW9" + payload[4:], None


def _corrupted(dev: str, known: Job) -> tuple[str, bytes, None]:
    t, payload = _framed(dev, known)
    flipped = bytearray(payload)
    flipped[-3] ^= 0x40  # inside the targets blob
    return t, bytes(flipped), None


def _huge_header(dev: str, known: Job) -> tuple[str, bytes, None]:
    return topic(dev, "jobs"), struct.pack("<4sI", b"STW1", 5 * 1024 * 1024) + b"{}", None


def _set_version(header: dict, blobs: list[bytes]) -> None:
    header["v"] = 2


def _unknown_field(header: dict, blobs: list[bytes]) -> None:
    header["body"]["priority"] = "urgent"


def _mistyped(header: dict, blobs: list[bytes]) -> None:
    header["body"]["hyper"]["epochs"] = "ten"


def _nan_targets(header: dict, blobs: list[bytes]) -> None:
    ref = header["body"]["targets"]["$tensor"]["data"]
    t = np.frombuffer(blobs[ref], "<f4").copy()
    t[3] = np.nan
    blobs[ref] = t.tobytes()


def _foreign(dev: str, known: Job) -> tuple[str, bytes, str]:
    other = "dev-b" if dev != "dev-b" else "dev-c"
    job = make_job(other)
    return topic(dev, "jobs"), encode(job)[1], job.msg_id


def _wrong_topic(kind: str) -> Callable[[str, Job], tuple[str, bytes, str]]:
    def build(dev: str, known: Job) -> tuple[str, bytes, str]:
        job = make_job(dev)
        return topic(dev, kind), encode(job)[1], job.msg_id

    return build


def _stale(dev: str, known: Job) -> tuple[str, bytes, str]:
    job = make_job(dev, sent_at=time.time() - 2 * MAX_AGE)
    return *encode(job), job.msg_id


def _unknown_job(dev: str, known: Job) -> tuple[str, bytes, str]:
    batch = make_batch(known, job_id="no-such-job")
    return *encode(batch), batch.msg_id


def _bad_shape(dev: str, known: Job) -> tuple[str, bytes, str]:
    batch = make_batch(known, shape=(SPEC.num_states, SPEC.width // 2))
    return *encode(batch), batch.msg_id


def _other_backbone(dev: str, known: Job) -> tuple[str, bytes, str]:
    batch = make_batch(known, backbone_fingerprint="cd" * 32)
    return *encode(batch), batch.msg_id


def _stray_keys(dev: str, known: Job) -> tuple[str, bytes, str]:
    batch = make_batch(known, keys=(known.keys[0], secrets.token_hex(32)))
    return *encode(batch), batch.msg_id


def _reused_id(dev: str, known: Job) -> tuple[str, bytes, str]:
    job = make_job(dev, n=len(known.keys), job_id=known.job_id)  # same id, other keys and targets
    return *encode(job), job.msg_id


BAD: dict[str, Bad] = {
    "truncated": Bad(_truncated, "bad_payload", r"truncated"),
    "random bytes": Bad(_random, "bad_payload", r"does not start with b'STW1'"),
    "wrong magic": Bad(_magic, "bad_payload", r"STW9.*not a sidetune v1 message"),
    "corrupted blob": Bad(_corrupted, "bad_checksum", r"blob 0 fails its checksum"),
    "oversized header": Bad(_huge_header, "too_large", r"header length 5242880 exceeds"),
    "unknown schema version": Bad(_edit(_set_version), "bad_version", r"unknown schema version 2"),
    "unknown field": Bad(_edit(_unknown_field), "invalid", r"priority: Extra inputs are not permitted"),
    "mistyped field": Bad(_edit(_mistyped), "invalid", r"hyper\.epochs: .*integer"),
    "NaN in targets": Bad(_edit(_nan_targets), "invalid", r"NaN"),
    "foreign device id": Bad(_foreign, "foreign", r"message for device 'dev-[bc]' arrived on device 'dev-\w+''s topic"),
    "job on the activations topic": Bad(_wrong_topic("activations"), "bad_topic",
                                        r"a jobs message cannot arrive on the activations topic"),
    "job on the status topic": Bad(_wrong_topic("status"), "bad_topic",
                                   r"a jobs message cannot arrive on the status topic"),
    "stale sent_at": Bad(_stale, "replayed", r"sent 1[12]\d\d s ago, older than 600 s: a replay"),
    "activations for an unknown job": Bad(_unknown_job, "unknown_job", r"no job no-such-job for device"),
    "activations of the wrong shape": Bad(_bad_shape, "spec_mismatch", r"\[5, 8\] per sample.*needs \[5, 16\]"),
    "activations of another backbone": Bad(_other_backbone, "spec_mismatch", r"another backbone"),
    "activations with keys not in the job": Bad(_stray_keys, "invalid", r"1 keys of this batch are not in job"),
    "job id reused for another job": Bad(_reused_id, "invalid", r"job id j-\w+ was already used for a different job"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_message_is_rejected_with_its_reason_and_the_worker_goes_on(case, server_and_device):
    worker, dev = server_and_device
    bad = BAD[case]
    known = make_job(dev.id)
    dev.job_answered(known)
    t, payload, ref = bad.build(dev.id, known)
    rejected, by_code = worker.stats.rejected, dict(worker.stats.by_code)
    start = len(dev.down)

    dev.publish(t, payload)

    rej = dev.down.wait(lambda m: isinstance(m, Rejection), 10, f"the rejection of {case}", start)
    assert isinstance(rej, Rejection)
    assert (rej.code, rej.ref_topic) == (bad.code, t), rej
    assert re.search(bad.reason, rej.reason), rej.reason
    if ref is not None and bad.code not in ("foreign", "bad_topic"):
        assert rej.ref_msg_id == ref
    assert worker.stats.rejected == rejected + 1
    assert worker.stats.by_code.get(bad.code, 0) == by_code.get(bad.code, 0) + 1
    # ... and the worker still works: a valid job is answered, the known job still takes activations
    job = make_job(dev.id)
    assert set(dev.job_answered(job).missing) == set(job.keys)
    start = len(dev.down)
    dev.send(make_batch(known, keys=known.keys[:2]))  # not all: the job is not trained (no retained adapter)
    got = dev.down.wait(lambda m: getattr(m, "job_id", None) == known.job_id, 10, "the known job's progress", start)
    assert isinstance(got, Progress) and (got.state, got.samples_cached) == ("waiting", 2), got
    assert worker.stats.rejected == rejected + 1


def test_every_bad_message_in_a_burst_is_answered_and_counted(server_and_device):
    """All the bad messages at once, without waiting in between: one rejection each, nothing else breaks."""
    worker, dev = server_and_device
    known = make_job(dev.id)
    dev.job_answered(known)
    before = worker.stats.rejected
    start = len(dev.down)
    sent = []
    for case, bad in BAD.items():
        t, payload, _ = bad.build(dev.id, known)
        dev.publish(t, payload)
        sent.append((case, bad.code))
    want: dict[str, int] = {}
    for _, code in sent:
        want[code] = want.get(code, 0) + 1

    def counts() -> dict[str, int]:
        got: dict[str, int] = {}
        for m in dev.down.messages[start:]:
            if isinstance(m, Rejection):
                got[m.code] = got.get(m.code, 0) + 1
        return got

    deadline = time.monotonic() + 15
    while counts() != want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counts() == want
    assert worker.stats.rejected == before + len(BAD)
    job = make_job(dev.id)
    assert set(dev.job_answered(job).missing) == set(job.keys)


@pytest.mark.parametrize("case", ["foreign device id", "job on the activations topic"])
def test_rejection_names_the_message_when_its_id_could_be_read(case, server_and_device):
    worker, dev = server_and_device
    known = make_job(dev.id)
    dev.job_answered(known)
    t, payload, ref = BAD[case].build(dev.id, known)
    start = len(dev.down)
    dev.publish(t, payload)
    rej = dev.down.wait(lambda m: isinstance(m, Rejection), 10, f"the rejection of {case}", start)
    assert isinstance(rej, Rejection)
    assert rej.ref_msg_id == ref
