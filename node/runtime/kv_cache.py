"""The K/V tensors of open inference sessions, by the cache handle the allocator granted.

The allocator decides who may hold memory; this store only holds it: a cache is created on a
session's first step and dropped when the allocator says the grant ended (or, as a safety net,
when nobody has stepped it for longer than any session may wait).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from node.runtime.checks import RequestError


class CacheMissing(RequestError):
    """A step of a session whose cache this runtime does not hold (it was replaced since, or the grant
    ended): the frontend rebuilds the cache from the session's history and sends the step again."""


@dataclass
class SessionCache:
    batch: int
    max_length: int
    start: int
    end: int
    kv: list  # one (K, V) pair per block of [start, end)
    length: int = 0  # positions [0, length) hold valid keys and values
    last_used: float = field(default_factory=time.monotonic)


class SessionCaches:
    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.caches: dict[int, SessionCache] = {}

    def get(
        self, handle: int, batch: int, max_length: int, start: int, end: int, position: int, blocks
    ) -> SessionCache:
        """The session's cache; made (uninitialized) on its first step at position 0."""
        cache = self.caches.get(handle)
        if cache is not None:
            if (cache.start, cache.end) != (start, end):
                raise RequestError(f"this session serves blocks {cache.start}:{cache.end}, not {start}:{end}")
            if (cache.batch, cache.max_length) != (batch, max_length):
                raise RequestError(
                    f"this session's cache holds a batch of {cache.batch} x {cache.max_length} tokens, "
                    f"not {batch} x {max_length}"
                )
            return cache
        if position != 0:
            raise CacheMissing("the attention cache of this session is gone (the server restarted); open a new session")
        kv = []
        for block in blocks:
            shape = block.kv_cache_shape(batch, max_length)
            kv.append(
                (
                    torch.empty(shape, dtype=self.dtype, device=self.device),
                    torch.empty(shape, dtype=self.dtype, device=self.device),
                )
            )
        cache = SessionCache(batch, max_length, start, end, kv)
        self.caches[handle] = cache
        return cache

    def drop(self, handles) -> None:
        for handle in handles:
            self.caches.pop(handle, None)

    def idle(self, seconds: float) -> list[int]:
        now = time.monotonic()
        return [h for h, c in self.caches.items() if now - c.last_used > seconds]

    def drop_idle(self, seconds: float) -> int:
        idle = self.idle(seconds)
        self.drop(idle)
        return len(idle)

    def items(self):
        return list(self.caches.items())

    def __len__(self) -> int:
        return len(self.caches)
