"""Bytes per sample of a whole job, counted from real encoded messages of the contract's codec (schemas/wire.py).

* sidetune: the job (keys and mixed targets) and the activation batches of the pivot states up
  (``upload_batch`` samples a message, in the wire dtype; every layer's or only the tapped ones, as
  the spec's ``states`` says), the cache report, one progress message per epoch and the adapter
  down; every sample's states travel once per job.
* full_activation (MobiLLM-style side-tuning without a cache): all T × (L+1) × d activations of
  every sample, every epoch, up (one activation message per sample, one row per token), plus the
  same job and adapter as sidetune.
* split_learning: the cut layer's T × d activations up and their gradient (same shape, same codec)
  down, every sample, every epoch, plus the job (labels) once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from schemas.activations import ActivationBatch
from schemas.adapter import AdapterUpdate
from schemas.jobs import CacheReport, Job
from schemas.progress import Progress
from schemas.spec import HyperParams, SideNetSpec
from schemas.tensors import WireTensor
from schemas.wire import encode

DEVICE = "bench-board"
JOB = "r1-bench"


def keys_of(n: int, salt: str = "") -> tuple[str, ...]:
    return tuple(hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n))


def _size(msg: object) -> int:
    return len(encode(msg)[1])  # type: ignore[arg-type]


def job_bytes(spec: SideNetSpec, hyper: HyperParams, n: int, fingerprint: str) -> int:
    targets = np.zeros((n, spec.out_dim), np.float32)
    return _size(Job(device_id=DEVICE, job_id=JOB, backbone_fingerprint=fingerprint, spec=spec, hyper=hyper,
                     keys=keys_of(n), targets=WireTensor.from_array(targets, "float32")))


def down_bytes(spec: SideNetSpec, hyper: HyperParams, n: int, fingerprint: str, weights: bytes) -> int:
    """Cache report (every key missing), one progress message per epoch, the adapter."""
    report = _size(CacheReport(device_id=DEVICE, job_id=JOB, total=n, missing=keys_of(n)))
    prog = _size(Progress(device_id=DEVICE, job_id=JOB, state="training", epoch=1, epochs=hyper.epochs,
                          train_loss=0.123456, val_loss=0.123456, samples_cached=n, samples_total=n))
    adapter = _size(AdapterUpdate(device_id=DEVICE, job_id=JOB, version=1, backbone_fingerprint=fingerprint, spec=spec,
                                  weights=weights, metrics={"train_loss": 0.1, "val_loss": 0.1}))
    return report + hyper.epochs * prog + adapter


def activation_bytes(states: np.ndarray, wire_dtype: str, fingerprint: str, upload_batch: int = 64) -> int:
    """Encoded activation batches of ``states`` (N, S, d) as the board's upload builds them."""
    total, keys = 0, keys_of(len(states))
    for i in range(0, len(states), upload_batch):
        part = np.asarray(states[i : i + upload_batch], dtype=np.float32)
        if wire_dtype == "float16":
            t = WireTensor(dtype="float16", shape=part.shape, data=part.astype("<f2").tobytes())
        else:
            t = WireTensor.from_array(part, wire_dtype)  # type: ignore[arg-type]
        total += _size(ActivationBatch(device_id=DEVICE, job_id=JOB, backbone_fingerprint=fingerprint,
                                       keys=keys[i : i + upload_batch], states=t))
    return total


def sidetune_bytes(states: np.ndarray, spec: SideNetSpec, hyper: HyperParams, fingerprint: str, weights: bytes,
                   wire_dtype: str = "float16", upload_batch: int = 64) -> dict[str, float]:
    n = len(states)
    rows = list(spec.wire_rows)  # every pivot state, or only the tapped ones (spec.states)
    sent = states if len(rows) == states.shape[1] else states[:, rows]
    up = job_bytes(spec, hyper, n, fingerprint) + activation_bytes(sent, wire_dtype, fingerprint, upload_batch)
    down = down_bytes(spec, hyper, n, fingerprint, weights)
    return {"up": up / n, "down": down / n, "per_sample": (up + down) / n}


def _per_length(lengths: Sequence[int], one: dict[int, int]) -> int:
    return sum(one[t] for t in lengths)


def full_activation_bytes(lengths: Sequence[int], num_states: int, width: int, spec: SideNetSpec,
                          hyper: HyperParams, fingerprint: str, weights: bytes) -> dict[str, float]:
    """All T × (L+1) × d fp16 activations of each sample, every epoch (one message per sample and epoch)."""
    one = {}
    for t in sorted(set(lengths)):
        data = bytes(t * num_states * width * 2)
        one[t] = _size(ActivationBatch(device_id=DEVICE, job_id=JOB, backbone_fingerprint=fingerprint,
                                       keys=keys_of(t, "tok"),
                                       states=WireTensor(dtype="float16", shape=(t, num_states, width), data=data)))
    n = len(lengths)
    up = job_bytes(spec, hyper, n, fingerprint) + hyper.epochs * _per_length(lengths, one)
    down = down_bytes(spec, hyper, n, fingerprint, weights)
    return {"up": up / n, "down": down / n, "per_sample": (up + down) / n}


def split_learning_bytes(lengths: Sequence[int], width: int, epochs: int, spec: SideNetSpec, hyper: HyperParams,
                         fingerprint: str) -> dict[str, float]:
    """The cut layer's T × d fp16 activation up and its gradient down, every sample, every epoch."""
    one = {}
    for t in sorted(set(lengths)):
        msg = ActivationBatch(device_id=DEVICE, job_id=JOB, backbone_fingerprint=fingerprint, keys=keys_of(1, f"s{t}"),
                              states=WireTensor(dtype="float16", shape=(1, t, width), data=bytes(t * width * 2)))
        one[t] = _size(msg)
    n = len(lengths)
    labels = job_bytes(spec, hyper, n, fingerprint)
    per_epoch = _per_length(lengths, one)
    return {"up": (labels + epochs * per_epoch) / n, "down": epochs * per_epoch / n,
            "per_sample": (labels + 2 * epochs * per_epoch) / n}
