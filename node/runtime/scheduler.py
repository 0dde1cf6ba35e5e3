"""Which work the runtime does next (PROTOCOL 5.8, and better: batches, fair across peers, bounded).

Inference steps go first, all that are ready at once (one per session: a session's next step cannot
start before its previous one ends), up to a budget of tokens per round; when more are ready, each peer
gets a step in turn, so a peer with many sessions cannot push another peer's step out of the round.
Forward and backward requests wait while inference steps are ready (for a bounded time: the engine's
MAX_TRAINING_WAIT); then forwards are taken together up to a token budget, or one backward, each peer in
turn, and within one peer's queue by Petals' `points` (higher first; points are not verified, so they
order a peer's own requests, never another peer's). Work whose requester gave up is dropped. The queues
are bounded, per peer and in all: what does not fit is refused at once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

MAX_QUEUED = 4096  # tasks waiting in all
MAX_QUEUED_PER_PEER = 256  # tasks one peer may have waiting


@dataclass
class Task:
    sender: bytes
    msg: object
    frames: list
    arrival: int = 0

    @property
    def key(self) -> tuple[bytes, int]:
        return self.sender, self.msg.req

    @property
    def peer(self) -> str:
        return getattr(self.msg, "peer", "")

    @property
    def points(self) -> float:
        return getattr(self.msg, "points", 0.0)


def tokens(task: Task) -> int:
    """B x T of the task's first tensor (the size Petals checks against max_batch_size)."""
    shape = task.msg.tensors[0].shape if task.msg.tensors else ()
    return shape[0] * shape[1] if len(shape) >= 2 else 1


@dataclass
class _Queues:
    """One kind of work, one queue per peer, peers served in turn."""

    by_peer: OrderedDict = field(default_factory=OrderedDict)  # peer -> deque[Task], in turn order
    count: int = 0

    def push(self, task: Task) -> None:
        self.by_peer.setdefault(task.peer, deque()).append(task)
        self.count += 1

    def remove(self, task: Task) -> None:
        queue = self.by_peer[task.peer]
        queue.remove(task)
        self.count -= 1
        if not queue:
            del self.by_peer[task.peer]

    def rotate(self, peer: str) -> None:
        """`peer` was served: it goes to the end of the turn."""
        if peer in self.by_peer:
            self.by_peer.move_to_end(peer)

    def __iter__(self):
        for queue in list(self.by_peer.values()):
            yield from list(queue)


def _first_of(queue: deque) -> Task:
    """A peer's next forward or backward: its own by points (higher first), then by arrival."""
    return max(queue, key=lambda t: (t.points, -t.arrival))


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, is_inference: Callable[[object], bool], is_forward: Callable[[object], bool]):
        self._is_inference = is_inference
        self._is_forward = is_forward
        self._inference = _Queues()
        self._training = _Queues()
        self._arrivals = 0
        self.queued_by_peer: dict[str, int] = {}

    @property
    def inference(self) -> list[Task]:
        return list(self._inference)

    @property
    def training(self) -> list[Task]:
        return list(self._training)

    def push(self, sender: bytes, msg, frames: list) -> None:
        """Queue a task; QueueFull (with the reason for the requester) if the queues are full."""
        task = Task(sender, msg, frames, self._arrivals)
        if len(self) >= MAX_QUEUED:
            raise QueueFull(f"the server has {len(self)} tasks waiting; retry later")
        if self.queued_by_peer.get(task.peer, 0) >= MAX_QUEUED_PER_PEER:
            raise QueueFull(f"you have {MAX_QUEUED_PER_PEER} tasks waiting on this server; wait for their results")
        self._arrivals += 1
        self.queued_by_peer[task.peer] = self.queued_by_peer.get(task.peer, 0) + 1
        (self._inference if self._is_inference(msg) else self._training).push(task)

    def _taken(self, queues: _Queues, task: Task) -> None:
        queues.remove(task)
        left = self.queued_by_peer[task.peer] - 1
        if left:
            self.queued_by_peer[task.peer] = left
        else:
            del self.queued_by_peer[task.peer]

    def _serve(self, queues: _Queues, peer: str, task: Task) -> None:
        """`task` of `peer` is taken to run: the peer goes to the end of the turn."""
        self._taken(queues, task)
        queues.rotate(peer)

    def cancel(self, sender: bytes, req: int) -> bool:
        for queues in (self._inference, self._training):
            for task in queues:
                if task.key == (sender, req):
                    self._taken(queues, task)
                    return True
        return False

    def take_inference(self, busy: Iterable = (), max_tokens: Optional[int] = None, cost=tokens) -> list[Task]:
        """Ready inference steps, at most one per session (msg.handle) and none of a session in `busy`, each
        peer in turn, while their `cost` fits in `max_tokens` (at least one step is taken)."""
        taken, seen, total = [], set(busy), 0
        while True:
            progressed = False
            for peer, queue in list(self._inference.by_peer.items()):
                task = next((t for t in queue if t.msg.handle not in seen), None)
                if task is None:
                    continue
                if max_tokens is not None and taken and total + cost(task) > max_tokens:
                    return taken
                seen.add(task.msg.handle)
                total += cost(task)
                taken.append(task)
                self._serve(self._inference, peer, task)
                progressed = True
            if not progressed:
                return taken

    def take_training_for_newcomers(self, busy_peers: set) -> list[Task]:
        """The next task, in turn, of a peer that has no work under way: taken whatever the budget, so that
        another peer's long forwards never keep a peer waiting for more than a round."""
        for peer, queue in list(self._training.by_peer.items()):
            if peer not in busy_peers:
                task = _first_of(queue)
                self._serve(self._training, peer, task)
                return [task]
        return []

    def take_training(self, max_tokens: int) -> list[Task]:
        """Forwards of each peer in turn (a peer's own by points, then arrival) while they fit in `max_tokens`
        (at least one), or one backward if the next in turn is a backward."""
        taken, total = [], 0
        while self._training.count:
            progressed = False
            for peer, queue in list(self._training.by_peer.items()):
                task = _first_of(queue)
                if not self._is_forward(task.msg):
                    if taken:
                        return taken
                    self._serve(self._training, peer, task)
                    return [task]
                size = tokens(task)
                if taken and total + size > max_tokens:
                    return taken
                total += size
                taken.append(task)
                self._serve(self._training, peer, task)
                progressed = True
            if not progressed:
                break
        return taken

    def __len__(self) -> int:
        return self._inference.count + self._training.count
