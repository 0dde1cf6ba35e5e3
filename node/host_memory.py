"""Keeping the host memory that requests free for the next ones, and giving it back once idle.

Used by the runtime, the frontends and the stream keeper (procs/runtime.py, procs/frontend.py,
procs/keeper.py): in all three a large request's buffers are allocated and freed again and again.

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
import functools
import os
import time
from typing import Callable, Optional

IDLE_SECONDS = 30.0  # idle this long after work before memory is given back
HEAP_BELOW = 64 << 20  # bytes: smaller allocations come from the heap and stay there until the idle trim
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_INT_MAX = (1 << 31) - 1
OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.cache
def libc() -> Optional[ctypes.CDLL]:
    """The C library, loaded once for every caller (errno readable with ctypes.get_errno); None if absent."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _malloc_trim() -> Optional[Callable[[int], int]]:
    trim = getattr(libc(), "malloc_trim", None)
    if trim is None:  # not glibc (musl, macOS): nothing to call
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def hold_freed_memory() -> bool:
    """Keep what requests free in the heap while the runtime works (the Trimmer gives it back once idle).

    glibc's default gives an allocation above its mmap threshold (adapting, up to 32 MiB) pages of its
    own, returned to the system when freed, and trims the heap's top as it shrinks: each round of a
    513-token prefill at the 8B shape faulted tens of MiB of activations in again. Measured in fresh
    processes (the blocks' 513-token pass, its linear choices known): 3.2 to 4.1 s for the first pass and
    2.8 s after with the defaults, 2.7 to 3.3 s and 2.6 to 2.7 s with these settings. So: allocations below
    HEAP_BELOW from the heap, and no automatic trim. Not where the operator set either himself
    (OPERATOR_SETTINGS, or glibc.malloc tunables in GLIBC_TUNABLES). True if set."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(k in os.environ for k in OPERATOR_SETTINGS) or "threshold" in tunables or "top_pad" in tunables:
        return False
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BELOW) and mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


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
        """True when it trimmed now. `busy`: work is under way; `done`: how much work has finished so far (any
        count that grows)."""
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
