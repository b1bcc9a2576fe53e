"""Test vectors: one valid payload per message kind, for clients in other languages.

``sidetune schema vectors DIR`` writes ``DIR/<kind>.bin`` and ``DIR/index.json``
(kind → topic, file, sha256). Everything is fixed (ids, times, values), so the
same build always writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from schemas.activations import ActivationBatch
from schemas.adapter import AdapterUpdate
from schemas.base import Message
from schemas.jobs import CacheReport, Job
from schemas.progress import Progress
from schemas.spec import HyperParams, SideNetSpec
from schemas.status import DeviceStatus, Rejection, RoundSummary
from schemas.tensors import WireTensor
from schemas.updates import WeightUpdate
from schemas.weights import encode_weights, expected_shapes
from schemas.wire import encode

DEVICE = "board-7"
FINGERPRINT = hashlib.sha256(b"example backbone").hexdigest()
SPEC = SideNetSpec(num_states=5, width=8, taps=(2, 4), bottleneck=2, out_dim=3)


def _key(i: int) -> str:
    return hashlib.sha256(f"sample {i}".encode()).hexdigest()


def _common(i: int) -> dict[str, Any]:
    return {"device_id": DEVICE, "msg_id": f"{i:032x}", "sent_at": 1764000000.0 + i}


def example_messages() -> dict[str, Message]:
    rng = np.random.default_rng(7)
    weights = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in expected_shapes(SPEC).items()}
    return {
        "jobs": Job(
            **_common(1), job_id="job-1", backbone_fingerprint=FINGERPRINT, spec=SPEC,
            hyper=HyperParams(epochs=3), keys=tuple(_key(i) for i in range(4)),
            targets=WireTensor.from_array(rng.normal(size=(4, 3)), "float32"),
        ),
        "cache": CacheReport(**_common(2), job_id="job-1", total=4, missing=(_key(1), _key(3))),
        "activations": ActivationBatch(
            **_common(3), job_id="job-1", backbone_fingerprint=FINGERPRINT, keys=(_key(1), _key(3)),
            states=WireTensor.from_array(rng.normal(size=(2, 5, 8)), "int8"),
        ),
        "progress": Progress(
            **_common(4), job_id="job-1", state="training", epoch=2, epochs=3, train_loss=0.25,
            val_loss=0.5, samples_cached=4, samples_total=4, detail="epoch 2 of 3",
        ),
        "adapter": AdapterUpdate(
            **_common(5), job_id="job-1", version=1, backbone_fingerprint=FINGERPRINT, spec=SPEC,
            weights=encode_weights(weights, SPEC), metrics={"train_loss": 0.25, "val_loss": 0.5},
        ),
        "errors": Rejection(
            **_common(6), ref_topic=f"sidetune/v1/{DEVICE}/activations", ref_msg_id=f"{3:032x}",
            code="bad_checksum", reason="blob 0 fails its checksum: corrupted in transit",
        ),
        "status": DeviceStatus(**_common(7), state="online", agent_version="0.1.0", adapter_version=1,
                               backbone_fingerprint=FINGERPRINT,
                               last_round=RoundSummary(round=1, samples=4, forward_passes=4, bytes_up=1234,
                                                       bytes_down=567, seconds=2.5, holdout_accuracy=0.75,
                                                       adapter_version=1, finished_at=1763999999.0)),
        "updates": WeightUpdate(**_common(8), job_id="fed-r1-1", cohort="press-line", backbone_fingerprint=FINGERPRINT,
                                spec=SPEC, base_version=1, samples=4, delta=encode_weights(weights, SPEC)),
    }


def write_vectors(out: Path) -> dict[str, dict[str, str]]:
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, dict[str, str]] = {}
    for kind, message in example_messages().items():
        topic, payload = encode(message)
        (out / f"{kind}.bin").write_bytes(payload)
        index[kind] = {"topic": topic, "file": f"{kind}.bin", "sha256": hashlib.sha256(payload).hexdigest()}
    (out / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index
