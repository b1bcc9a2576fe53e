"""The worker's incoming queue, served round robin by device.

A FIFO lets a device that sends many heavy messages at once (big jobs, 16 MiB batches) hold
back every other device's messages behind its own. Here each device has its own queue and
the worker takes one message of each device in turn; within a device the order is kept.
Its size is bounded by the broker's receive window (MQTT v5 Receive Maximum): the broker
sends no more unacknowledged messages than that, so ``put`` never blocks and never drops.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict, deque

from schemas.errors import WireError
from schemas.topics import Topic
from schemas.transport import Incoming


class FairInbox:
    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Incoming]] = OrderedDict()  # device -> its messages; next first
        self._cond = threading.Condition()

    def put(self, item: Incoming) -> None:
        try:
            device = Topic.parse(item.topic).device_id
        except WireError:
            device = ""  # a topic of no device: its own queue (the handler rejects it)
        with self._cond:
            self._queues.setdefault(device, deque()).append(item)
            self._cond.notify()

    def get(self, timeout: float) -> Incoming:
        """The next message of the device whose turn it is; ``queue.Empty`` after ``timeout``."""
        with self._cond:
            if not self._queues and not self._cond.wait_for(lambda: bool(self._queues), timeout):
                raise queue.Empty
            device, q = next(iter(self._queues.items()))
            item = q.popleft()
            del self._queues[device]
            if q:
                self._queues[device] = q  # to the back of the round
            return item

    def __len__(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())
