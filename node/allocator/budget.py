"""The attention-cache budget (PROTOCOL 5.7): who holds how many bytes, until when, and who waits.

Beside it, the history budget: host memory in which frontends keep what each session sent, to rebuild
its cache on a replaced runtime (node/frontend/history.py). A grant takes its history bytes when they
fit; a session granted without them is served all the same, but cannot survive a runtime restart.

Pure bookkeeping with the clock passed in; the allocator process wraps it with sockets and timers.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from node.runtime.tensor_parallel.split import kv_heads_per_rank
from protocol.wire import ITEMSIZE as DTYPE_BYTES  # bytes per value of each dtype: the one table


@dataclass(frozen=True)
class CacheGeometry:
    """The numbers the budget formulas need, from the node plan."""

    hidden_size: int
    num_kv_heads: int
    head_dim: int
    kv_groups: int  # as Petals budgets it (Mixtral: 1), see PROTOCOL 7.3 item 12
    dtype_bytes: int
    num_blocks: int
    attn_cache_tokens: int
    history_bytes: Optional[int] = None  # --history_bytes; None: what every session the cache holds needs

    @classmethod
    def of(cls, plan) -> "CacheGeometry":
        return cls(
            hidden_size=plan.hidden_size,
            # with tensor parallelism a session's cache is split: what the busiest device holds counts
            num_kv_heads=kv_heads_per_rank(plan.num_attention_heads, plan.num_kv_heads, plan.tp_world),
            head_dim=plan.head_dim,
            kv_groups=plan.kv_groups,
            dtype_bytes=DTYPE_BYTES[plan.torch_dtype],
            num_blocks=plan.num_blocks,
            attn_cache_tokens=plan.attn_cache_tokens,
            history_bytes=plan.history_bytes,
        )

    @property
    def capacity(self) -> int:
        return cache_bytes_per_block(self.hidden_size, self.attn_cache_tokens, self.kv_groups, self.dtype_bytes) * (
            self.num_blocks
        )

    @property
    def history_capacity(self) -> int:
        """Enough for every session the cache can hold at once, however short their spans: a block's
        cache holds attn_cache_tokens tokens, each kept in the history as one hidden state."""
        if self.history_bytes is not None:
            return self.history_bytes
        return history_bytes_per_block(self.hidden_size, self.attn_cache_tokens, self.dtype_bytes) * self.num_blocks

    def session_history_bytes(self, batch: int, max_length: int) -> int:
        """One hidden state per row and position, in the node's dtype."""
        return batch * max_length * self.hidden_size * self.dtype_bytes

    def session_bytes(self, batch: int, max_length: int, blocks: int) -> int:
        """K and V of every block of the chain, as the runtime lays them out."""
        return 2 * batch * self.num_kv_heads * self.head_dim * max_length * self.dtype_bytes * blocks

    def tokens_left(self, bytes_left: int) -> int:
        """DHT `cache_tokens_left`: one K or V row of one block."""
        return bytes_left // (self.hidden_size * self.dtype_bytes // self.kv_groups)

    def tokens_available(self, bytes_left: int) -> int:
        """rpc_info `cache_tokens_available`: K and V of one block at batch 1."""
        return bytes_left // (2 * self.num_kv_heads * self.head_dim * self.dtype_bytes)


def cache_bytes_per_block(hidden_size: int, attn_cache_tokens: int, kv_groups: int, dtype_bytes: int) -> int:
    """The attention cache budget of one block: K and V rows of --attn_cache_tokens tokens, as Petals counts
    them (PROTOCOL 5.3; also what the memory estimate keeps per block, node/supervisor/placement.py)."""
    return (2 * hidden_size * attn_cache_tokens // kv_groups) * dtype_bytes


def history_bytes_per_block(hidden_size: int, attn_cache_tokens: int, dtype_bytes: int) -> int:
    """Host memory for the inputs of the sessions filling one block's cache, kept to rebuild their caches on
    a replaced runtime: one hidden state per token (also counted by the memory estimate,
    node/supervisor/placement.py)."""
    return attn_cache_tokens * hidden_size * dtype_bytes


class AllocationFailed(Exception):
    pass


@dataclass
class Lease:
    handle: int
    session: str
    owner: str
    size: int
    expires_at: float
    peer: str = ""  # the client that holds it
    history: int = 0  # bytes of history memory held for it (0: none; it cannot be rebuilt)


@dataclass
class Waiter:
    req: int
    owner: str
    session: str
    size: int
    deadline: float  # when to give up waiting
    lease_seconds: float
    what: str = ""  # for error messages: "1x2048 tokens over 4 blocks"
    peer: str = ""
    history: int = 0  # bytes of history it asks for beside the cache


@dataclass
class CacheBudget:
    capacity: int
    used: int = 0
    leases: dict[int, Lease] = field(default_factory=dict)
    waiters: deque = field(default_factory=deque)
    history_capacity: int = 0
    history_used: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def _fail(self, waiter: Waiter, why: str) -> AllocationFailed:
        return AllocationFailed(
            f"Could not allocate {waiter.size} bytes of attention cache ({waiter.what}): {why}; "
            f"{self.free} of {self.capacity} bytes free"
        )

    def _grant(self, waiter: Waiter, now: float) -> Lease:
        handle = random.getrandbits(62)
        while handle in self.leases or handle == 0:
            handle = random.getrandbits(62)
        history = waiter.history if self.history_used + waiter.history <= self.history_capacity else 0
        lease = Lease(
            handle, waiter.session, waiter.owner, waiter.size, now + waiter.lease_seconds, waiter.peer, history
        )
        self.leases[handle] = lease
        self.used += waiter.size
        self.history_used += history
        return lease

    def request(self, waiter: Waiter, now: float, first: bool = False) -> Optional[Lease]:
        """Grant at once, queue (None), or raise AllocationFailed. `first`: the request goes before those
        waiting (a session taken over from a frontend that died, whose grant was just given back)."""
        if waiter.size > self.capacity:
            raise self._fail(waiter, "larger than the whole cache")
        queued = sum(w.size for w in self.waiters)
        if (first or not self.waiters) and self.used + waiter.size <= self.capacity:
            return self._grant(waiter, now)
        if waiter.deadline <= now:
            why = "the cache is full" if self.used + waiter.size > self.capacity else "others are waiting"
            raise self._fail(waiter, f"{why} and alloc_timeout is 0 ({queued} bytes queued)")
        self.waiters.append(waiter)
        return None

    def release(self, handle: int) -> Optional[Lease]:
        lease = self.leases.pop(handle, None)
        if lease is not None:
            self.used -= lease.size
            self.history_used -= lease.history
        return lease

    def grow_history(self, handle: int, nbytes: int) -> bool:
        """The grant's history becomes `nbytes` if that fits beside the others'; else it gives its history
        up (0 bytes: the session cannot be rebuilt). Whether it fits; an unknown grant does not."""
        lease = self.leases.get(handle)
        if lease is None:
            return False
        fits = lease.history > 0 and self.history_used - lease.history + nbytes <= self.history_capacity
        self.history_used += (nbytes if fits else 0) - lease.history
        lease.history = nbytes if fits else 0
        return fits

    def grant_waiting(self, now: float) -> list[tuple[Waiter, Lease]]:
        """First come, first served: grant from the head of the queue while it fits."""
        granted = []
        while self.waiters and self.used + self.waiters[0].size <= self.capacity:
            waiter = self.waiters.popleft()
            granted.append((waiter, self._grant(waiter, now)))
        return granted

    def expire(self, now: float) -> tuple[list[Lease], list[tuple[Waiter, AllocationFailed]]]:
        expired = [lease for lease in self.leases.values() if lease.expires_at <= now]
        for lease in expired:
            self.release(lease.handle)
        timed_out = []
        for waiter in [w for w in self.waiters if w.deadline <= now]:
            self.waiters.remove(waiter)
            timed_out.append((waiter, self._fail(waiter, "timed out waiting for room")))
        return expired, timed_out

    def drop_owner(self, owner: str) -> tuple[list[Lease], list[Waiter]]:
        leases = [lease for lease in self.leases.values() if lease.owner == owner]
        for lease in leases:
            self.release(lease.handle)
        waiters = [w for w in self.waiters if w.owner == owner]
        for waiter in waiters:
            self.waiters.remove(waiter)
        return leases, waiters

    def adopt(self, lease: Lease) -> bool:
        """Take over a grant made by a previous allocator (its owner still holds it)."""
        if lease.handle in self.leases:
            return False
        self.leases[lease.handle] = lease
        self.used += lease.size
        self.history_used += lease.history
        return True

    def sessions_of(self, peer: str) -> int:
        """Grants held and waited for by one peer."""
        return sum(lease.peer == peer for lease in self.leases.values()) + sum(w.peer == peer for w in self.waiters)

    def next_deadline(self) -> Optional[float]:
        times = [lease.expires_at for lease in self.leases.values()] + [w.deadline for w in self.waiters]
        return min(times) if times else None
