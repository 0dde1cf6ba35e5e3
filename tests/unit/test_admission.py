"""The allocator's decisions (node/allocator/admission.py) driven in-process, without ZeroMQ: grants,
refusals by limit, one session per id, releases that free the runtime's tensors, waiting for room,
pushes routed to the frontend holding the session, a replaced frontend's sessions dropped."""

from __future__ import annotations

import structlog

from node.allocator.admission import Admission
from protocol.messages import (
    Adopt,
    Allocate,
    Capacity,
    CapacityQuery,
    Failure,
    Granted,
    PushDelivery,
    PushRoute,
    Release,
)
from tests.helpers.plans import micro_plan

F0, F1 = b"frontend.0", b"frontend.1"


class Driver:
    def __init__(self, tmp_path, *flags):
        self.replies: list = []
        self.dropped: list = []
        plan = micro_plan(str(tmp_path), *flags)
        self.admission = Admission(
            plan,
            structlog.get_logger(),
            lambda to, msg, frames=(): self.replies.append((to, msg, list(frames))),
            self.dropped.extend,
        )
        self.req = 0

    def allocate(self, sender=F0, session="s", peer="p", batch=1, max_length=64, timeout=0.0, resumed=False):
        self.req += 1
        msg = Allocate(self.req, session, batch, max_length, 4, timeout, peer=peer, resumed=resumed)
        self.admission.take(sender, msg)
        return self.answer(sender, self.req)

    def answer(self, to, req):
        found = [m for t, m, _ in self.replies if t == to and getattr(m, "req", None) == req]
        return found[-1] if found else None

    def max_length_taking(self, share: int = 1) -> int:
        """The largest max_length (a power of two from 64) whose session takes at most 1/share of the cache."""
        budget, geometry = self.admission.budget, self.admission.geometry
        length = 64
        while geometry.session_bytes(1, length * 2, 4) <= budget.capacity // share:
            length *= 2
        return length


def test_grants_and_releases_free_the_runtimes_tensors(tmp_path):
    d = Driver(tmp_path)
    granted = d.allocate(session="a")
    assert isinstance(granted, Granted) and granted.history > 0
    d.admission.take(F0, Release(granted.handle))
    assert d.dropped == [granted.handle]
    assert d.admission.stats().sessions == 0


def test_one_open_session_per_id(tmp_path):
    d = Driver(tmp_path)
    assert isinstance(d.allocate(session="a"), Granted)
    again = d.allocate(sender=F1, session="a")
    assert isinstance(again, Failure) and "session_id a is already open on this server" in again.error


def test_session_limits_in_all_and_per_peer(tmp_path):
    d = Driver(tmp_path, "--max_sessions", "3", "--max_sessions_per_peer", "2")
    assert [type(d.allocate(session=s, peer="p")).__name__ for s in "ab"] == ["Granted", "Granted"]
    refused = d.allocate(session="c", peer="p")
    assert "you have 2 sessions open on this server" in refused.error
    assert isinstance(d.allocate(session="c", peer="q"), Granted)
    assert "the server has 3 sessions open" in d.allocate(session="d", peer="r").error
    assert d.admission.stats().refused == {"peer_sessions": 1, "sessions": 1}


def test_a_session_larger_than_the_cache_is_refused_and_one_that_waits_is_granted_later(tmp_path):
    d = Driver(tmp_path, "--attn_cache_tokens", "256")
    too_big = d.allocate(session="huge", max_length=100_000)
    assert isinstance(too_big, Failure)
    first = d.allocate(session="a", max_length=256)
    assert isinstance(first, Granted)
    assert d.allocate(session="b", max_length=256, timeout=30) is None  # waits for room
    d.admission.take(F0, Release(first.handle))
    assert isinstance(d.answer(F0, d.req), Granted)


def test_pushes_go_to_the_frontend_holding_the_session(tmp_path):
    d = Driver(tmp_path)
    d.allocate(sender=F1, session="held-by-1")
    d.admission.take(F0, PushRoute("held-by-1"), [b"request"])
    d.admission.take(F0, PushRoute("unknown"), [b"request"])
    pushed = [(to, m, frames) for to, m, frames in d.replies if isinstance(m, PushDelivery)]
    assert pushed == [(F1, PushDelivery("held-by-1"), [b"request"])]


def test_a_replaced_frontends_sessions_end_and_an_adopted_grant_is_kept(tmp_path):
    d = Driver(tmp_path)
    a = d.allocate(sender=F0, session="a")
    b = d.allocate(sender=F1, session="b")
    d.admission.owner_down("frontend.0")
    assert d.dropped == [a.handle]
    fresh = Driver(tmp_path)  # a replaced allocator: frontend.1 tells it what it holds
    fresh.admission.take(F1, Adopt(b.handle, "b", 1, 64, 4, 600.0, peer="p"))
    fresh.admission.take(F0, CapacityQuery(7))
    capacity = fresh.answer(F0, 7)
    assert isinstance(capacity, Capacity) and capacity.sessions == 1
    assert "already open" in fresh.allocate(session="b").error


def test_the_same_frontend_asking_again_for_its_session_gets_the_same_grant(tmp_path):
    """A frontend's Allocate was granted but the reply was lost (the allocator replaced meanwhile, the
    request sent again): the second ask gets the first grant, not 'already open', and no second lease.
    Another frontend, or another peer, naming the same session id is still refused."""
    d = Driver(tmp_path)
    first = d.allocate(sender=F0, session="s", peer="p")
    again = d.allocate(sender=F0, session="s", peer="p")
    assert isinstance(again, Granted) and again.handle == first.handle
    assert d.admission.stats().sessions == 1
    assert "already open" in d.allocate(sender=F1, session="s", peer="p").error
    assert "already open" in d.allocate(sender=F0, session="s", peer="q").error
    assert "already open" in d.allocate(sender=F0, session="s", peer="p", max_length=32).error


def test_a_session_handed_over_takes_its_dead_frontends_grant_over(tmp_path):
    """The stream keeper handed a session to frontend.1 before the news of frontend.0's death reached the
    allocator: its Allocate (resumed) replaces the old grant, whose cache is dropped. Only for the same
    client: another peer naming the session id is still refused."""
    d = Driver(tmp_path)
    old = d.allocate(sender=F0, session="s", peer="p")
    assert "already open" in d.allocate(sender=F1, session="s", peer="q", resumed=True).error
    new = d.allocate(sender=F1, session="s", peer="p", resumed=True)
    assert isinstance(new, Granted) and new.handle != old.handle
    assert d.dropped == [old.handle] and d.admission.stats().sessions == 1
    d.admission.owner_down("frontend.0")  # the news comes: nothing of frontend.1's is dropped
    assert d.dropped == [old.handle] and d.admission.stats().sessions == 1


def test_a_session_handed_over_goes_before_those_waiting(tmp_path):
    """With the cache full and a session waiting, the taken-over session's new request went behind the
    waiter and, with no alloc_timeout, failed ("others are waiting"): a hand-over the client saw. It goes on
    with the room it held; what it no longer needs goes to the waiter."""
    d = Driver(tmp_path)
    budget, half = d.admission.budget, d.max_length_taking(2)
    d.allocate(sender=F0, session="s", peer="p", max_length=half)
    d.allocate(sender=F0, session="x", peer="q", max_length=half)  # the cache is full
    assert d.allocate(sender=F0, session="w", peer="r", max_length=half, timeout=30.0) is None  # waits
    taken = d.allocate(sender=F1, session="s", peer="p", max_length=half, resumed=True)
    assert isinstance(taken, Granted) and len(budget.waiters) == 1


def test_a_session_id_waiting_for_room_is_not_granted_twice(tmp_path):
    """The one-session-per-id check looked at grants only: two requests naming one id while the cache was
    full both waited, and both were granted (pushes then found only the second)."""
    d = Driver(tmp_path)
    budget, full = d.admission.budget, d.max_length_taking()
    d.allocate(session="x", max_length=full)
    assert d.allocate(sender=F0, session="w", peer="p", max_length=8, timeout=30.0) is None  # waits
    twice = d.allocate(sender=F1, session="w", peer="p", max_length=8, timeout=30.0)
    assert "already open" in twice.error and len(budget.waiters) == 1


def test_a_wait_asked_again_by_its_frontend_is_answered_once_with_the_later_request(tmp_path):
    """A frontend whose request failed over to a replaced allocator asks again while the first copy waits:
    one waiter, answered under the second request's number (the first one's caller has gone)."""
    d = Driver(tmp_path)
    budget, full = d.admission.budget, d.max_length_taking()
    first = d.allocate(session="x", max_length=full)
    assert d.allocate(sender=F0, session="w", peer="p", max_length=8, timeout=30.0) is None
    asked_before = d.req
    assert d.allocate(sender=F0, session="w", peer="p", max_length=8, timeout=30.0) is None
    assert len(budget.waiters) == 1
    d.admission.take(F0, Release(first.handle))  # room
    granted = d.answer(F0, d.req)
    assert isinstance(granted, Granted) and d.answer(F0, asked_before) is None
    assert d.admission.stats().sessions == 1


def test_a_take_over_replaces_its_dead_frontends_waiting_request(tmp_path):
    d = Driver(tmp_path)
    budget, full = d.admission.budget, d.max_length_taking()
    d.allocate(session="x", max_length=full)
    assert d.allocate(sender=F0, session="w", peer="p", max_length=8, timeout=30.0) is None
    assert d.allocate(sender=F1, session="w", peer="p", max_length=8, timeout=30.0, resumed=True) is None
    assert [w.owner for w in budget.waiters] == ["frontend.1"]
