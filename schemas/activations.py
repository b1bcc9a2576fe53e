"""Pivot activations: ``(N, L+1, d)`` per batch, fp16 or int8 (or fp32)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from schemas.base import Fingerprint, JobId, Message, SampleKey
from schemas.limits import MAX_BATCH_SAMPLES
from schemas.tensors import WireTensor


class ActivationBatch(Message):
    KIND: ClassVar[str] = "activations"

    job_id: JobId
    backbone_fingerprint: Fingerprint
    keys: tuple[SampleKey, ...] = Field(min_length=1, max_length=MAX_BATCH_SAMPLES)
    #: (N, L+1, d): one pivot vector per backbone state (embedding + every layer).
    states: WireTensor

    @model_validator(mode="after")
    def _consistent(self) -> ActivationBatch:
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("batch keys must be unique")
        if len(self.states.shape) != 3 or self.states.shape[0] != len(self.keys):
            raise ValueError(
                f"states must have shape [{len(self.keys)}, L+1, d] (one row per key), got {list(self.states.shape)}"
            )
        if self.states.shape[1] < 1 or self.states.shape[2] < 1:
            raise ValueError("states have an empty dimension")
        return self
