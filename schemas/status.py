"""Device status (retained, also the last will) and the server's rejections."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints

from schemas.base import Fingerprint, Message, MsgId, Text

Version = Annotated[str, StringConstraints(max_length=64)]


class DeviceStatus(Message):
    KIND: ClassVar[str] = "status"

    state: Literal["online", "offline"]
    agent_version: Version
    adapter_version: int = Field(default=0, ge=0, le=2**31)
    backbone_fingerprint: Fingerprint | None = None


RejectCode = Literal[
    "bad_topic", "bad_payload", "too_large", "bad_version", "bad_checksum", "invalid",
    "foreign", "replayed", "spec_mismatch", "unknown_job", "internal",
    # A per-device quota (side_server/quotas.py; the reason names the setting), or a full cache:
    "quota_jobs", "quota_samples", "quota_cache", "quota_records", "quota_sidenet", "quota_memory",
    "quota_work", "quota_rate", "server_full",
]


class Rejection(Message):
    """Why the server rejected one message (sent on the device's ``errors`` topic)."""

    KIND: ClassVar[str] = "errors"

    ref_topic: Annotated[str, StringConstraints(max_length=256)]
    ref_msg_id: MsgId | None = None
    code: RejectCode
    reason: Text
