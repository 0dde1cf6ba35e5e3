"""Which work the runtime does next (PROTOCOL 5.8, and better: batches).

Inference steps go first, all that are ready at once (one per session: a session's next step cannot
start before its previous one ends). Forward and backward requests wait while inference steps are
ready; then forwards are taken together in arrival order up to a token budget, or one backward.
Work whose requester gave up is dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass
class Task:
    sender: bytes
    msg: object
    frames: list

    @property
    def key(self) -> tuple[bytes, int]:
        return self.sender, self.msg.req


def tokens(task: Task) -> int:
    """B x T of the task's first tensor (the size Petals checks against max_batch_size)."""
    shape = task.msg.tensors[0].shape if task.msg.tensors else ()
    return shape[0] * shape[1] if len(shape) >= 2 else 1


class Scheduler:
    def __init__(self, is_inference: Callable[[object], bool], is_forward: Callable[[object], bool]):
        self._is_inference = is_inference
        self._is_forward = is_forward
        self.inference: deque[Task] = deque()
        self.training: deque[Task] = deque()

    def push(self, sender: bytes, msg, frames: list) -> None:
        task = Task(sender, msg, frames)
        (self.inference if self._is_inference(msg) else self.training).append(task)

    def cancel(self, sender: bytes, req: int) -> bool:
        for queue in (self.inference, self.training):
            for task in queue:
                if task.key == (sender, req):
                    queue.remove(task)
                    return True
        return False

    def take_inference(self, busy: Iterable = ()) -> list[Task]:
        """Every ready inference step whose session (msg.handle) has no step in progress."""
        taken, seen, kept = [], set(busy), deque()
        for task in self.inference:
            if task.msg.handle in seen:
                kept.append(task)
            else:
                seen.add(task.msg.handle)
                taken.append(task)
        self.inference = kept
        return taken

    def take_training(self, max_tokens: int) -> list[Task]:
        """Forwards in arrival order while they fit in `max_tokens` (at least one), or one backward."""
        if not self.training:
            return []
        if not self._is_forward(self.training[0].msg):
            return [self.training.popleft()]
        taken, total = [], 0
        while self.training and self._is_forward(self.training[0].msg):
            size = tokens(self.training[0])
            if taken and total + size > max_tokens:
                break
            total += size
            taken.append(self.training.popleft())
        return taken

    def __len__(self) -> int:
        return len(self.inference) + len(self.training)
