"""Which piece of work the runtime does next (PROTOCOL 5.8): inference steps before forward and
backward passes, each kind in arrival order; work whose requester gave up is skipped.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Optional

INFERENCE_PRIORITY = 1.0
TRAINING_PRIORITY = 2.0  # forward and backward wait while inference steps are ready


@dataclass(order=True)
class Task:
    priority: float
    seq: int
    sender: bytes = field(compare=False)
    msg: object = field(compare=False)
    frames: list = field(compare=False)


class Scheduler:
    def __init__(self):
        self._heap: list[Task] = []
        self._seq = itertools.count()
        self._cancelled: set[tuple[bytes, int]] = set()

    def push(self, sender: bytes, msg, frames: list, inference: bool) -> None:
        priority = INFERENCE_PRIORITY if inference else TRAINING_PRIORITY
        heapq.heappush(self._heap, Task(priority, next(self._seq), sender, msg, frames))

    def cancel(self, sender: bytes, req: int) -> None:
        if any(t.sender == sender and t.msg.req == req for t in self._heap):
            self._cancelled.add((sender, req))

    def pop(self) -> Optional[Task]:
        while self._heap:
            task = heapq.heappop(self._heap)
            key = (task.sender, task.msg.req)
            if key in self._cancelled:
                self._cancelled.discard(key)
                continue
            return task
        return None

    def __len__(self) -> int:
        return len(self._heap)
