"""The allocator's decisions: which sessions get attention cache, which wait or are refused, and the
directory of live sessions (session id -> the frontend that holds it, for rpc_push).

No sockets: procs/allocator.py hands it each message (`take`) and its control orders; answers go out
through the `reply` callable, and grants that end through `drop` (the runtime frees their tensors). The
bytes themselves are counted by node/allocator/budget.py; the limits here are the node's and each
peer's number of sessions (--max_sessions, --max_sessions_per_peer) and one open session per session id.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

from node.allocator.budget import AllocationFailed, CacheBudget, CacheGeometry, Lease, Waiter
from protocol.messages import (
    Adopt,
    Allocate,
    AllocatorReady,
    AllocatorStats,
    Capacity,
    CapacityQuery,
    Failure,
    Granted,
    GrowHistory,
    Message,
    PushDelivery,
    PushRoute,
    Release,
)
from protocol.plan import NodePlan

Reply = Callable[..., None]  # reply(to whom, the answer, its frames=())


class Admission:
    def __init__(self, plan: NodePlan, log, reply: Reply, drop: Callable[[list[int]], None]):
        self.plan = plan
        self.log = log
        self.reply = reply
        self.drop = drop  # cache handles whose grant ended
        self.geometry = CacheGeometry.of(plan)
        self.budget = CacheBudget(self.geometry.capacity, history_capacity=self.geometry.history_capacity)
        self.sessions: dict[str, Lease] = {}
        self.refused: dict[str, int] = {}
        self.without_history = 0  # grants made without history room

    def ready(self) -> AllocatorReady:
        return AllocatorReady(
            capacity_bytes=self.budget.capacity, tokens=self.geometry.tokens_left(self.budget.capacity)
        )

    def next_deadline(self) -> Optional[float]:
        """When (time.monotonic(): a step of the wall clock must not end leases early or waits late) a lease
        lapses or a waiter times out next."""
        return self.budget.next_deadline()

    # --- receiving ---------------------------------------------------------------------------

    def take(self, sender: bytes, msg: Message, frames: Sequence = ()) -> None:
        owner = sender.decode(errors="replace")
        now = time.monotonic()
        if isinstance(msg, Allocate):
            self.allocate(sender, owner, msg, now)
        elif isinstance(msg, Release):
            lease = self.budget.release(msg.handle)
            if lease is not None:
                self.ended([lease], "released")
                self.grant_waiting(now)
        elif isinstance(msg, GrowHistory):
            self.grow_history(sender, msg)
        elif isinstance(msg, Adopt):
            lease = Lease(
                msg.handle,
                msg.session,
                owner,
                self.geometry.session_bytes(msg.batch, msg.max_length, msg.blocks),
                now + msg.expires_in,
                msg.peer,
                msg.history,
            )
            if self.budget.adopt(lease):
                self.sessions[lease.session] = lease
                self.log.info("adopted session", session=msg.session, owner=owner, bytes=lease.size)
        elif isinstance(msg, CapacityQuery):
            left = max(0, self.budget.free)
            self.reply(
                sender,
                Capacity(
                    msg.req,
                    left,
                    self.geometry.tokens_left(left),
                    self.geometry.tokens_available(left),
                    len(self.budget.leases),
                ),
            )
        elif isinstance(msg, PushRoute):
            lease = self.sessions.get(msg.session)
            if lease is not None and len(frames) == 1:
                self.reply(lease.owner.encode(), PushDelivery(msg.session), frames)

    def owner_down(self, name: str) -> None:
        """A frontend died: its sessions ended with it."""
        leases, waiters = self.budget.drop_owner(name)
        if leases or waiters:
            self.log.info("dropped sessions of a replaced frontend", frontend=name, sessions=len(leases))
        self.ended(leases, "owner replaced")
        self.grant_waiting(time.monotonic())

    def resize(self, num_blocks: int) -> None:
        """The budget follows the number of blocks served (chosen after this process started)."""
        if num_blocks == self.geometry.num_blocks:
            return
        self.geometry = dataclasses.replace(self.geometry, num_blocks=num_blocks)
        self.budget.capacity = self.geometry.capacity
        self.budget.history_capacity = self.geometry.history_capacity
        self.log.info(
            "cache budget set",
            blocks=num_blocks,
            capacity_bytes=self.budget.capacity,
            history_bytes=self.budget.history_capacity,
        )
        self.grant_waiting(time.monotonic())

    # --- deciding ----------------------------------------------------------------------------

    def allocate(self, sender: bytes, owner: str, msg: Allocate, now: float) -> None:
        held = self.sessions.get(msg.session) if msg.session else None
        taken_over = held is not None and msg.resumed and held.peer == msg.peer
        if taken_over:
            lease = self.budget.release(held.handle)
            self.log.info("session taken over", session=msg.session, owner=owner, previous_owner=held.owner)
            self.ended([lease] if lease is not None else [], "taken over")
            held = None
        if held is not None:
            size = self.geometry.session_bytes(msg.batch, msg.max_length, msg.blocks)
            if (held.owner, held.peer, held.size) == (owner, msg.peer, size):
                # The same frontend asking again for a session it reserved by name: its first Allocate was
                # granted but the reply was lost (this allocator replaced meanwhile, the request sent again).
                # Frontends reserve a session id before they ask, so this is never a second session.
                self.log.info("allocation asked again: the same grant", session=msg.session, owner=owner)
                self.reply(sender, Granted(msg.req, held.handle, held.history))
                return
            self.reply(sender, Failure(msg.req, f"session_id {msg.session} is already open on this server"))
            return
        waiting = next((w for w in self.budget.waiters if w.session == msg.session), None) if msg.session else None
        if waiting is not None:  # one grant per id, waiting ones included
            size = self.geometry.session_bytes(msg.batch, msg.max_length, msg.blocks)
            if (waiting.owner, waiting.peer, waiting.size) == (owner, msg.peer, size):
                waiting.req = msg.req  # its frontend asking again (its first request failed over): this one
                return  # is answered
            if msg.resumed and waiting.peer == msg.peer:
                self.budget.waiters.remove(waiting)  # its dead frontend's request: the take-over replaces it
            else:
                self.reply(sender, Failure(msg.req, f"session_id {msg.session} is already open on this server"))
                return
        plan = self.plan
        if len(self.budget.leases) + len(self.budget.waiters) >= plan.max_sessions:
            self.refuse(sender, msg, "sessions", f"the server has {plan.max_sessions} sessions open; retry later")
            return
        if self.budget.sessions_of(msg.peer) >= plan.max_sessions_per_peer:
            error = f"you have {plan.max_sessions_per_peer} sessions open on this server; close one first"
            self.refuse(sender, msg, "peer_sessions", error)
            return
        timeout = max(0.0, min(msg.timeout, self.plan.max_alloc_timeout))
        waiter = Waiter(
            req=msg.req,
            owner=owner,
            session=msg.session,
            size=self.geometry.session_bytes(msg.batch, msg.max_length, msg.blocks),
            deadline=now + timeout,
            lease_seconds=msg.lease,
            what=f"batch {msg.batch} x {msg.max_length} tokens over {msg.blocks} blocks",
            peer=msg.peer,
            history=self.geometry.session_history_bytes(msg.batch, msg.max_length),
        )
        try:
            # a session taken over goes on with the room it held, before those waiting: it must not fail
            lease = self.budget.request(waiter, now, first=taken_over)
        except AllocationFailed as e:
            self.log.info("allocation refused", session=msg.session, reason=str(e))
            self.reply(sender, Failure(msg.req, str(e)))
            return
        if lease is not None:
            self.granted(waiter, lease)
        if taken_over:
            self.grant_waiting(now)  # what it held and no longer needs

    def refuse(self, sender: bytes, msg: Allocate, reason: str, error: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.log.info("refused", reason=reason, peer=msg.peer, session=msg.session, detail=error)
        self.reply(sender, Failure(msg.req, error))

    def granted(self, waiter: Waiter, lease: Lease) -> None:
        if lease.session:
            self.sessions[lease.session] = lease
        self.log.debug("granted", session=lease.session, bytes=lease.size, free=self.budget.free)
        if lease.history < waiter.history:
            self.without_history += 1
            self.log.warning(
                "session granted without history room: it cannot survive a runtime restart",
                session=lease.session,
                peer=lease.peer,
                history_bytes=waiter.history,
                history_free=self.budget.history_capacity - self.budget.history_used,
            )
        self.reply(waiter.owner.encode(), Granted(waiter.req, lease.handle, lease.history))

    def grow_history(self, sender: bytes, msg: GrowHistory) -> None:
        lease = self.budget.leases.get(msg.handle)
        if lease is None:
            self.reply(sender, Failure(msg.req, "its cache grant is not held by this allocator"))
            return
        had = lease.history
        if self.budget.grow_history(msg.handle, msg.bytes):
            self.reply(sender, Granted(msg.req, msg.handle, msg.bytes))
            return
        self.without_history += had > 0
        free = self.budget.history_capacity - self.budget.history_used
        error = f"its history of {msg.bytes} bytes did not fit in the node's history memory ({free} bytes free)"
        self.log.warning(
            "session history given up: it cannot survive a runtime restart",
            session=lease.session,
            peer=lease.peer,
            history_bytes=msg.bytes,
            history_free=free,
        )
        self.reply(sender, Failure(msg.req, error))

    def grant_waiting(self, now: float) -> None:
        for waiter, lease in self.budget.grant_waiting(now):
            self.granted(waiter, lease)

    def expire(self) -> None:
        now = time.monotonic()
        expired, timed_out = self.budget.expire(now)
        if expired:
            self.log.info("leases lapsed", sessions=[lease.session for lease in expired])
            self.ended(expired, "lease lapsed")
        for waiter, error in timed_out:
            self.reply(waiter.owner.encode(), Failure(waiter.req, str(error)))
        if expired or timed_out:
            self.grant_waiting(now)

    # --- sending -----------------------------------------------------------------------------

    def ended(self, leases: list[Lease], why: str) -> None:
        if not leases:
            return
        for lease in leases:
            if self.sessions.get(lease.session) is lease:
                del self.sessions[lease.session]
        self.drop([lease.handle for lease in leases])

    def stats(self) -> AllocatorStats:
        return AllocatorStats(
            refused=dict(self.refused),
            used_bytes=self.budget.used,
            capacity_bytes=self.budget.capacity,
            # in Petals' cache_tokens_left unit, for node/supervisor/metrics.py
            tokens_used=self.geometry.tokens_left(self.budget.used),
            tokens_left=self.geometry.tokens_left(max(0, self.budget.capacity - self.budget.used)),
            sessions=len(self.budget.leases),
            waiting=len(self.budget.waiters),
            history_bytes=self.budget.history_used,
            history_capacity=self.budget.history_capacity,
            sessions_without_history=self.without_history,
        )
