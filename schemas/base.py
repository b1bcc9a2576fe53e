"""The envelope every message shares: schema version, device, message id, time."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.limits import MAX_TEXT
from schemas.spec import FINGERPRINT_PATTERN
from schemas.topics import DEVICE_ID_PATTERN

DeviceId = Annotated[str, StringConstraints(pattern=f"^{DEVICE_ID_PATTERN}$")]
MsgId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8,64}$")]
#: A cohort (boards that share a task, made by `sidetune broker add-device --cohort`): a device id's charset.
CohortName = Annotated[str, StringConstraints(pattern=f"^{DEVICE_ID_PATTERN}$")]
JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
SampleKey = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Fingerprint = Annotated[str, StringConstraints(pattern=FINGERPRINT_PATTERN)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]


def new_msg_id() -> str:
    return uuid.uuid4().hex


class Message(BaseModel):
    """Base of every wire message. ``KIND`` is the topic suffix it travels on."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    KIND: ClassVar[str]

    v: Literal[1] = 1  # SCHEMA_VERSION
    device_id: DeviceId
    msg_id: MsgId = Field(default_factory=new_msg_id)
    sent_at: float = Field(default_factory=time.time, ge=0, le=1e11)
