"""The attention-cache budget (PROTOCOL 5.7) and the supervisor's restart intensity, as pure logic."""

from __future__ import annotations

import pytest

from node.allocator.budget import AllocationFailed, CacheBudget, CacheGeometry, Waiter
from node.supervisor.processes import RestartIntensity, backoff

# micro-llama: hidden 64, 4 heads, 2 KV heads (groups 2), float32, 4 blocks, GQA default 16384 tokens
MICRO = CacheGeometry(
    hidden_size=64, num_kv_heads=2, head_dim=16, kv_groups=2, dtype_bytes=4, num_blocks=4, attn_cache_tokens=16384
)


def waiter(size, deadline=0.0, req=1, owner="frontend.0", session="s"):
    return Waiter(req=req, owner=owner, session=session, size=size, deadline=deadline, lease_seconds=100)


def test_units_match_the_recorded_petals_server():
    # the vectors' rpc_info says 65536 and the DHT record 131072 for this very configuration
    assert MICRO.tokens_available(MICRO.capacity) == 65536
    assert MICRO.tokens_left(MICRO.capacity) == 131072
    # a session of max_length tokens over n blocks at batch 1 costs exactly max_length * n available tokens
    assert MICRO.tokens_available(MICRO.capacity - MICRO.session_bytes(1, 100, 3)) == 65536 - 300


def test_grant_release_and_immediate_failure():
    budget = CacheBudget(1000)
    lease = budget.request(waiter(600), now=0)
    assert lease is not None and budget.used == 600
    with pytest.raises(AllocationFailed, match="cache is full"):
        budget.request(waiter(600), now=0)  # alloc_timeout 0: fail at once
    with pytest.raises(AllocationFailed, match="larger than the whole cache"):
        budget.request(waiter(1001, deadline=50), now=0)
    budget.release(lease.handle)
    assert budget.used == 0 and budget.request(waiter(1000), now=0) is not None


def test_waiters_are_served_first_come_first_served_and_time_out():
    budget = CacheBudget(1000)
    first = budget.request(waiter(800), now=0)
    assert budget.request(waiter(500, deadline=10, req=2), now=0) is None  # queued
    assert budget.request(waiter(100, deadline=10, req=3), now=0) is None  # fits, but queued behind req 2
    with pytest.raises(AllocationFailed, match="others are waiting"):
        budget.request(waiter(100, req=4), now=0)
    budget.release(first.handle)
    granted = budget.grant_waiting(now=1)
    assert [w.req for w, _ in granted] == [2, 3]
    assert budget.request(waiter(500, deadline=5, req=5), now=1) is None
    expired, timed_out = budget.expire(now=6)
    assert not expired and [w.req for w, _ in timed_out] == [5]


def test_leases_lapse_and_owners_are_dropped():
    budget = CacheBudget(1000)
    a = budget.request(waiter(100, owner="frontend.0"), now=0)
    b = budget.request(waiter(100, owner="frontend.1"), now=0)
    a_expires = a.expires_at
    expired, _ = budget.expire(now=a_expires + 1)
    assert {lease.handle for lease in expired} == {a.handle, b.handle}
    c = budget.request(waiter(100, owner="frontend.1"), now=200)
    leases, _ = budget.drop_owner("frontend.1")
    assert [lease.handle for lease in leases] == [c.handle] and budget.used == 0


def test_adopting_a_grant_keeps_accounting_across_allocator_restarts():
    old = CacheBudget(1000)
    lease = old.request(waiter(700), now=0)
    new = CacheBudget(1000)
    assert new.adopt(lease) and not new.adopt(lease)
    assert new.used == 700


def test_history_is_granted_while_it_fits_and_the_session_is_served_either_way():
    # micro-llama's default: 16384 tokens x 64 values x 4 bytes per block, for its 4 blocks
    assert MICRO.history_capacity == 16384 * 64 * 4 * 4
    assert MICRO.session_history_bytes(2, 100) == 2 * 100 * 64 * 4
    budget = CacheBudget(1000, history_capacity=500)
    first = budget.request(Waiter(1, "frontend.0", "a", 100, 0.0, 100, history=400), now=0)
    second = budget.request(Waiter(2, "frontend.0", "b", 100, 0.0, 100, history=400), now=0)
    assert first.history == 400 and second.history == 0 and budget.history_used == 400  # served, not rebuildable
    budget.release(first.handle)
    assert budget.history_used == 0
    third = budget.request(Waiter(3, "frontend.0", "c", 100, 0.0, 100, history=400), now=0)
    assert third.history == 400
    new = CacheBudget(1000, history_capacity=500)
    assert new.adopt(third) and new.history_used == 400


def test_a_grant_history_grows_while_it_fits_else_it_is_given_up():
    budget = CacheBudget(1000, history_capacity=1000)
    first = budget.request(Waiter(1, "frontend.0", "a", 100, 0.0, 100, history=400), now=0)
    second = budget.request(Waiter(2, "frontend.0", "b", 100, 0.0, 100, history=400), now=0)
    assert budget.grow_history(first.handle, 600) and first.history == 600 and budget.history_used == 1000
    assert not budget.grow_history(second.handle, 500)  # no room: the session keeps its cache, not its history
    assert second.history == 0 and budget.history_used == 600
    assert not budget.grow_history(second.handle, 400)  # given up for good
    assert not budget.grow_history(12345, 10)  # not a grant of this allocator
    budget.release(first.handle)
    assert budget.history_used == 0


def test_restart_intensity_and_backoff():
    intensity = RestartIntensity(max_restarts=2, window=60)
    assert intensity.allow(0) and intensity.allow(1)
    assert not intensity.allow(2)
    assert RestartIntensity(2, 60).allow(0)
    later = RestartIntensity(2, 10)
    assert later.allow(0) and later.allow(1) and later.allow(20)  # the first two fell out of the window
    assert backoff(1) == 0 and backoff(2) > 0 and backoff(20) == 5.0
