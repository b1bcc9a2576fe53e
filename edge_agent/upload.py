"""Uploads: the pivot states the server asked for, as encoded activation batches.

Only keys the server reported missing travel, each once per request; a sample
whose states this board already dropped (the server's cache evicted it since)
runs through the backbone again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent.config import EdgeSettings
from edge_agent.ledger import Ledger
from edge_agent.model import LocalModel
from schemas.activations import ActivationBatch
from schemas.tensors import WireTensor
from schemas.wire import encode

log = logging.getLogger("sidetune.edge.upload")


@dataclass
class Upload:
    messages: list[tuple[str, bytes, bool]]  # (topic, payload, retain) for the outbox
    keys: list[str]  # the keys they carry
    unknown: list[str]  # keys this board does not know
    recomputed: int  # forward passes run again


def activation_messages(settings: EdgeSettings, model: LocalModel, ledger: Ledger, job_id: str, keys: list[str],
                        pet: Callable[[], None] = lambda: None) -> Upload:
    by_key = ledger.samples_by_key(keys)
    unknown = [k for k in keys if k not in by_key]
    recompute = [by_key[k] for k in keys if k in by_key and by_key[k].states is None]
    if recompute:  # evicted from the server's cache after we dropped them: compute again
        f = model.fx.from_token_ids([s.token_ids for s in recompute])
        for j, s in enumerate(recompute):
            s.states = f.states[j].astype("<f2").tobytes()
    known = [k for k in keys if k in by_key]
    n_states, width = model.spec.num_states, model.spec.width
    rows = list(model.spec.wire_rows)  # every pivot state, or only the tapped ones (spec.states)
    messages = []
    for i in range(0, len(known), settings.upload_batch):
        part = known[i : i + settings.upload_batch]
        raw = b"".join(by_key[k].states or b"" for k in part)
        arr = np.frombuffer(raw, "<f2").reshape(len(part), n_states, width)
        if len(rows) != n_states:
            arr = arr[:, rows]
        if settings.wire_dtype == "float16":
            states = WireTensor(dtype="float16", shape=arr.shape, data=np.ascontiguousarray(arr).tobytes())
        else:
            states = WireTensor.from_array(arr.astype(np.float32), settings.wire_dtype)  # type: ignore[arg-type]
        batch = ActivationBatch(device_id=settings.device_id, job_id=job_id,
                                backbone_fingerprint=model.backbone.fingerprint, keys=tuple(part), states=states)
        t, payload = encode(batch)
        messages.append((t, payload, False))
        pet()
    return Upload(messages, known, unknown, len(recompute))
