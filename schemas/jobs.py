"""A device's training job, and the server's answer about its cache."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from schemas.base import CohortName, Fingerprint, JobId, Message, SampleKey
from schemas.limits import MAX_JOB_SAMPLES
from schemas.spec import HyperParams, SideNetSpec
from schemas.tensors import WireTensor


class Job(Message):
    """Train ``spec`` on these samples: keys, and their mixed targets ``M·(onehot(y) − p_b)``.

    ``targets`` is float32 ``(N, K)``; no label, no text, no token id travels.
    """

    KIND: ClassVar[str] = "jobs"

    job_id: JobId
    backbone_fingerprint: Fingerprint
    spec: SideNetSpec
    hyper: HyperParams = HyperParams()
    base_adapter_version: int = Field(default=0, ge=0, le=2**31, description="0: start from a fresh side network")
    keys: tuple[SampleKey, ...] = Field(min_length=1, max_length=MAX_JOB_SAMPLES)
    targets: WireTensor
    #: The cohort whose shared mixing the targets are in (the board's ``cohort`` setting): the server
    #: pools the job with the other members' samples only if its operator made this device a member
    #: of this cohort (else ``not_member``); ``None``: the board trains alone.
    cohort: CohortName | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Job:
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("job keys must be unique")
        if self.targets.dtype != "float32":
            raise ValueError(f"targets travel as float32, not {self.targets.dtype}")
        want = (len(self.keys), self.spec.out_dim)
        if self.targets.shape != want:
            raise ValueError(f"targets must have shape {list(want)} (keys × out_dim), got {list(self.targets.shape)}")
        return self


class CacheReport(Message):
    """Which of a job's keys the server's cache lacks (the device sends only those)."""

    KIND: ClassVar[str] = "cache"

    job_id: JobId
    total: int = Field(ge=0, le=MAX_JOB_SAMPLES)
    missing: tuple[SampleKey, ...] = Field(max_length=MAX_JOB_SAMPLES)

    @model_validator(mode="after")
    def _consistent(self) -> CacheReport:
        if len(self.missing) > self.total:
            raise ValueError("more keys missing than the job holds")
        return self
