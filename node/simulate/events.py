"""The event queue: simulated time jumps from one event to the next.

An event may belong to a server: it is dropped if the server left since it was scheduled (its epoch
moved on), so a departed server's timers need no cancelling. Ties run in the order they were
scheduled, which keeps a run with a given seed the same every time.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable


class Events:
    def __init__(self):
        self.now = 0.0
        self.queue: list = []
        self.order = itertools.count()

    def at(self, delay: float, action: Callable, *args, server=None) -> None:
        epoch = server.epoch if server is not None else None
        heapq.heappush(self.queue, (self.now + max(delay, 0.0), next(self.order), action, args, server, epoch))

    def run_until(self, end: float) -> None:
        while self.queue and self.queue[0][0] <= end:
            self.now, _, action, args, server, epoch = heapq.heappop(self.queue)
            if server is not None and server.epoch != epoch:
                continue
            action(*args)
        self.now = end
