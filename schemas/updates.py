"""A federated cohort member's update, device → server: what its side network learnt on the board.

A member with ``pool = "weights"`` trains the cohort's side network on its own cached states and
clean labels (nothing per sample leaves the board) and sends only the change of the weights
from the cohort adapter it started from, ``Δ = w_trained − w_base`` (safetensors, the spec's
parameter names). The server averages the members' changes (FedAvg, weighted by samples, each
member's share capped; optionally clipped and noised) into the cohort's next adapter.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from schemas.base import CohortName, Fingerprint, JobId, Message
from schemas.limits import MAX_JOB_SAMPLES
from schemas.spec import SideNetSpec
from schemas.weights import WeightsError, check_weights


class WeightUpdate(Message):
    KIND: ClassVar[str] = "updates"

    #: The board's round, as a job id names it: a resend of one update carries the same id.
    job_id: JobId
    cohort: CohortName
    backbone_fingerprint: Fingerprint
    spec: SideNetSpec
    #: The cohort adapter version the board trained from (0: a fresh network, seeded ``init_seed``).
    base_version: int = Field(ge=0, le=2**31)
    init_seed: int = Field(default=0, ge=0, le=2**31 - 1)
    #: Training samples behind it (its weight in the average, before the cap).
    samples: int = Field(ge=1, le=MAX_JOB_SAMPLES)
    #: safetensors bytes: Δ of every parameter.
    delta: bytes

    @model_validator(mode="after")
    def _delta_matches_spec(self) -> WeightUpdate:
        try:
            check_weights(self.delta, self.spec)
        except WeightsError as e:
            raise ValueError(str(e)) from None
        return self
