"""Topic names: ``sidetune/v1/{device_id}/{kind}``, built and parsed here only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from schemas.errors import WireError

PREFIX = "sidetune/v1"

Kind = Literal["jobs", "cache", "activations", "progress", "adapter", "errors", "status", "updates"]
KINDS: tuple[str, ...] = get_args(Kind)

#: Messages a device publishes (the server reads these from every device).
UPLINK_KINDS: tuple[str, ...] = ("jobs", "activations", "status", "updates")
#: Messages the server publishes to one device.
DOWNLINK_KINDS: tuple[str, ...] = ("cache", "progress", "adapter", "errors")

DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise WireError(
            f"bad device id {device_id!r}: 1-64 characters from A-Z a-z 0-9 _ -, "
            "starting with a letter or digit",
            code="bad_topic",
        )
    return device_id


@dataclass(frozen=True)
class Topic:
    device_id: str
    kind: str

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        if self.kind not in KINDS:
            raise WireError(f"unknown message kind {self.kind!r}; known: {', '.join(KINDS)}", code="bad_topic")

    def __str__(self) -> str:
        return f"{PREFIX}/{self.device_id}/{self.kind}"

    @classmethod
    def parse(cls, topic: str) -> Topic:
        if not isinstance(topic, str):
            raise WireError(f"topic must be a string, not {type(topic).__name__}", code="bad_topic")
        parts = topic.split("/")
        if len(parts) != 4 or "/".join(parts[:2]) != PREFIX:
            raise WireError(f"topic {topic[:200]!r} is not of the form {PREFIX}/<device_id>/<kind>", code="bad_topic")
        return cls(parts[2], parts[3])


def topic(device_id: str, kind: str) -> str:
    return str(Topic(device_id, kind))


def subscription(kind: str, device_id: str = "+", share_group: str | None = None) -> str:
    """A subscription filter for one kind, all devices by default; shared if a group is named."""
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r}", code="bad_topic")
    flt = f"{PREFIX}/{device_id}/{kind}"
    return f"$share/{share_group}/{flt}" if share_group else flt
