"""protocol/requester.py over real ZeroMQ sockets: a reply finds its request, and a reply to a request that
stopped waiting goes to the owner's `on_unsolicited` (a frontend releases a grant nobody waits for)."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from protocol.messages import Allocate, AllocatorReply, Granted
from protocol.requester import Requester
from protocol.transport import AsyncChannel

ENDPOINT = "inproc://requester-test"


def run(body):
    async def main():
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(ENDPOINT)
        allocator = AsyncChannel(router, Allocate, router=True)
        unsolicited = []
        requester = Requester(ctx, ENDPOINT, "frontend.0", AllocatorReply, on_unsolicited=unsolicited.append)
        requester.start()
        try:
            return await asyncio.wait_for(body(allocator, requester, unsolicited), 10), unsolicited
        finally:
            requester.close()
            allocator.close(0)
            ctx.term()

    return asyncio.run(main())


def test_a_reply_in_time_answers_its_request():
    async def body(allocator, requester, unsolicited):
        asking = asyncio.ensure_future(requester.request(Allocate(requester.next_id(), "s", 1, 8, 2), timeout=5))
        envelope = await allocator.recv()
        allocator.send(Granted(envelope.msg.req, handle=3), to=envelope.sender)
        return (await asking).msg

    answer, unsolicited = run(body)
    assert answer.handle == 3 and unsolicited == []


def test_a_reply_after_its_request_timed_out_is_unsolicited():
    """A grant made once the session had stopped waiting was dropped, and its cache held until the lease
    lapsed: its owner now sees it (procs/frontend.py releases it)."""

    async def body(allocator, requester, unsolicited):
        msg = Allocate(requester.next_id(), "s", 1, 8, 2)
        try:
            await requester.request(msg, timeout=0.05)
        except asyncio.TimeoutError:
            pass
        envelope = await allocator.recv()
        allocator.send(Granted(envelope.msg.req, handle=9), to=envelope.sender)
        while not unsolicited:
            await asyncio.sleep(0.01)

    _, unsolicited = run(body)
    assert [(type(e.msg), e.msg.handle) for e in unsolicited] == [(Granted, 9)]


def test_a_request_failed_over_waits_for_the_replacement_but_not_for_our_own_stop():
    """request_surviving sends again to a peer's replacement; a request failed while the peer is up (the
    frontend's drain ends: fail_all) was sent again too, and a session still opening got no final error."""
    from protocol.requester import PeerUnavailable

    async def body(allocator, requester, unsolicited):
        def make():
            return Allocate(requester.next_id(), "s", 1, 8, 2)

        stopping = asyncio.ensure_future(requester.request_surviving(make, timeout=5))
        await allocator.recv()
        requester.fail_all("shutting down")
        try:
            await stopping
            raise AssertionError("sent again")
        except PeerUnavailable:
            pass
        replaced = asyncio.ensure_future(requester.request_surviving(make, timeout=5))
        await allocator.recv()
        requester.down("the allocator died")
        await asyncio.sleep(0.05)
        requester.up()
        again = await allocator.recv()  # sent again to the replacement
        allocator.send(Granted(again.msg.req, handle=5), to=again.sender)
        return (await replaced).msg.handle

    handle, _ = run(body)
    assert handle == 5
