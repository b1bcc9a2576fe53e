"""The wire contract of sidetune: the only package both the board and the server import.

``encode(message) -> (topic, payload)`` and ``decode(topic, payload) -> message``
are the entry points; :class:`WireError` is the one error bad input raises.
"""

from schemas.activations import ActivationBatch
from schemas.adapter import AdapterUpdate
from schemas.base import Message, new_msg_id
from schemas.errors import SidetuneError, SpecMismatch, WireError
from schemas.jobs import CacheReport, Job
from schemas.limits import SCHEMA_VERSION
from schemas.progress import Progress
from schemas.spec import HyperParams, SideNetSpec
from schemas.status import DeviceStatus, Rejection
from schemas.tensors import WireTensor
from schemas.topics import KINDS, Topic, subscription, topic
from schemas.updates import WeightUpdate
from schemas.weights import WeightsError, decode_weights, encode_weights, expected_shapes
from schemas.wire import MESSAGE_TYPES, decode, encode

__all__ = [
    "KINDS", "MESSAGE_TYPES", "SCHEMA_VERSION",
    "ActivationBatch", "AdapterUpdate", "CacheReport", "DeviceStatus", "HyperParams", "Job",
    "Message", "Progress", "Rejection", "SideNetSpec", "SidetuneError", "SpecMismatch", "Topic",
    "WeightUpdate", "WeightsError", "WireError", "WireTensor",
    "decode", "decode_weights", "encode", "encode_weights", "expected_shapes", "new_msg_id",
    "subscription", "topic",
]
