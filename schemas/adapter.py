"""Versioned side-network weights, server → device (retained)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, StringConstraints, model_validator

from schemas.base import Fingerprint, JobId, Message
from schemas.spec import SideNetSpec
from schemas.weights import WeightsError, check_weights

MetricName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class AdapterUpdate(Message):
    KIND: ClassVar[str] = "adapter"

    job_id: JobId
    version: int = Field(ge=1, le=2**31)
    base_version: int = Field(default=0, ge=0, le=2**31)
    backbone_fingerprint: Fingerprint
    spec: SideNetSpec
    #: safetensors bytes: the side network's weights only.
    weights: bytes
    metrics: dict[MetricName, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _weights_match_spec(self) -> AdapterUpdate:
        try:
            check_weights(self.weights, self.spec)
        except WeightsError as e:
            raise ValueError(str(e)) from None
        return self
