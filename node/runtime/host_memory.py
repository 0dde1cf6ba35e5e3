"""Giving the host memory that a forward or backward freed back to the system.

glibc keeps what torch frees on the CPU in its heaps for reuse: after one backward at the 8B shape the
runtime holds ~850 MiB more than once ONLINE (docs/benchmarks.md), memory the blocks do not need until
the next large request, and which a neighbouring process (or the node's own move, loading beside the
current blocks) cannot use. malloc_trim returns the free pages of every heap. The next large request
then faults its memory in again: a backward at the 8B shape right after a trim took ~10% longer (12.8 to
16.2 s against 12.0 to 14.3 s, alternating, in-process). So the memory goes back only once the runtime
has been idle IDLE_SECONDS after work: a peer that trains (forward, backward, its own step, again) keeps
it, a node nobody trains on gives it back; never between a session's steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Callable, Optional

IDLE_SECONDS = 30.0  # idle this long after work before memory is given back


def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class Trimmer:
    """Call `tick(busy, done)` from the runtime's loop (`done`: requests finished so far): after work, once
    idle for IDLE_SECONDS, it trims once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, trim: Optional[Callable[[int], int]] = None):
        self.clock = clock
        self.trim = trim if trim is not None else _malloc_trim()
        self.done = 0
        self.idle_since: Optional[float] = None
        self.dirty = False  # work finished since the last trim
        self.trims = 0

    def tick(self, busy: bool, done: int) -> bool:
        """True when it trimmed now."""
        now = self.clock()
        if busy or done != self.done:
            self.dirty, self.done, self.idle_since = True, done, now
            return False
        if not self.dirty or self.trim is None or now - self.idle_since < IDLE_SECONDS:
            return False
        self.trim(0)
        self.dirty = False
        self.trims += 1
        return True
