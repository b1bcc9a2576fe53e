"""Device status (retained, also the last will) and the server's rejections."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.base import Fingerprint, Message, MsgId, Text
from schemas.limits import MAX_JOB_SAMPLES

Version = Annotated[str, StringConstraints(max_length=64)]


class RoundSummary(BaseModel):
    """What the board's last finished round took and gave (the operator's views: ``sidetune
    fleet``, the dashboard). Figures the board counted itself; ``holdout_accuracy`` only when
    the board has a held-out file (``holdout_file``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    round: int = Field(ge=1, le=2**31)
    samples: int = Field(default=0, ge=0, le=MAX_JOB_SAMPLES)
    forward_passes: int = Field(default=0, ge=0, le=2**40)
    bytes_up: int = Field(default=0, ge=0, le=2**50)
    bytes_down: int = Field(default=0, ge=0, le=2**50)
    seconds: float = Field(default=0.0, ge=0, le=1e9, allow_inf_nan=False)
    holdout_accuracy: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    adapter_version: int = Field(default=0, ge=0, le=2**31)
    finished_at: float = Field(default=0.0, ge=0, le=1e11)


class DeviceStatus(Message):
    KIND: ClassVar[str] = "status"

    state: Literal["online", "offline"]
    agent_version: Version
    adapter_version: int = Field(default=0, ge=0, le=2**31)
    backbone_fingerprint: Fingerprint | None = None
    #: The last round the board finished (None: none yet, or a board from before this field).
    last_round: RoundSummary | None = None


RejectCode = Literal[
    "bad_topic", "bad_payload", "too_large", "bad_version", "bad_checksum", "invalid",
    "foreign", "replayed", "spec_mismatch", "unknown_job", "internal",
    # A per-device quota (side_server/quotas.py; the reason names the setting), or a full cache:
    "quota_jobs", "quota_samples", "quota_cache", "quota_records", "quota_sidenet", "quota_memory",
    "quota_work", "quota_rate", "server_full",
    # Cohorts: a board naming a cohort its operator did not put it in; a member's job or update of
    # another task than the cohort's (another backbone fingerprint or side-network spec).
    "not_member", "cohort_mismatch",
]


class Rejection(Message):
    """Why the server rejected one message (sent on the device's ``errors`` topic)."""

    KIND: ClassVar[str] = "errors"

    ref_topic: Annotated[str, StringConstraints(max_length=256)]
    ref_msg_id: MsgId | None = None
    code: RejectCode
    reason: Text
