"""Training progress, server → device."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from schemas.base import JobId, Message, Text
from schemas.limits import MAX_JOB_SAMPLES

JobState = Literal["waiting", "training", "publishing", "done", "failed"]


class Progress(Message):
    KIND: ClassVar[str] = "progress"

    job_id: JobId
    state: JobState
    epoch: int = Field(default=0, ge=0, le=1000)
    epochs: int = Field(default=0, ge=0, le=1000)
    train_loss: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    val_loss: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    samples_cached: int = Field(default=0, ge=0, le=MAX_JOB_SAMPLES)
    samples_total: int = Field(default=0, ge=0, le=MAX_JOB_SAMPLES)
    detail: Text = ""
