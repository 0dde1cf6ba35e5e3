"""The frontend's link to the block runtime: one request's round trip, and what happens when the runtime
is replaced while it holds it.

A forward or backward holds no state in the runtime, so `call_surviving` sends it again to the
replacement (the client sees only the delay). An inference step needs its session's cache, which the
replacement does not hold: its session (node/frontend/session.py) rebuilds the cache first, using
`generation` to tell whether the runtime changed since the cache was made.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Optional, Sequence

from node.frontend.errors import RuntimeLostCache, RuntimeReplaced, ShuttingDown
from protocol.messages import SHUTTING_DOWN, Cancel, Failure, Message, TensorMeta
from protocol.requester import PeerUnavailable, Requester
from protocol.wire import RawTensor


class RuntimeLink:
    def __init__(self, requester: Requester, stopping: Callable[[], bool]):
        self.requester = requester
        self.stopping = stopping  # a frontend that stops does not wait for a replacement
        self.generation = 0  # runtimes replaced so far: a session's cache lives in one generation

    def next_id(self) -> int:
        return self.requester.next_id()

    @staticmethod
    def metas(tensors: Sequence[RawTensor]) -> list[TensorMeta]:
        return [TensorMeta(t.dtype, tuple(t.shape)) for t in tensors]

    async def call(
        self,
        msg: Message,
        tensors: Sequence[RawTensor],
        timeout: float,
        spent: Optional[Callable[[int], None]] = None,
    ) -> list[RawTensor]:
        """Run one task on the runtime; a vanished client or a timeout withdraws it from the queue.
        RuntimeReplaced if the runtime went away meanwhile (the caller decides how to go on). `spent` is
        given the runtime's compute for it, in microseconds."""
        try:
            envelope = await self.requester.request(msg, [t.data for t in tensors], timeout)
        except asyncio.TimeoutError:
            self.requester.send(Cancel(msg.req))
            raise TimeoutError(f"the server did not finish the request within {timeout:.0f} s") from None
        except asyncio.CancelledError:
            self.requester.send(Cancel(msg.req))
            raise
        except PeerUnavailable as e:
            raise RuntimeReplaced(str(e)) from None
        reply = envelope.msg
        if isinstance(reply, Failure):
            if reply.restarting:
                raise RuntimeReplaced(reply.error)
            if reply.cache_missing:
                raise RuntimeLostCache(reply.error)
            raise RuntimeError(reply.error)
        if len(envelope.frames) != len(reply.tensors):
            raise RuntimeError("internal error: the runtime sent a malformed reply")
        if spent is not None:
            spent(reply.compute_us)
        return [RawTensor(m.dtype, tuple(m.shape), f.buffer) for m, f in zip(reply.tensors, envelope.frames)]

    def down(self) -> None:
        """The runtime (or a rank of its group) died: its replacement holds no session's cache."""
        self.generation += 1
        self.requester.down("the block runtime restarted")

    def up(self) -> None:
        self.requester.up()

    async def back(self, generation: int, deadline: float) -> None:
        """After a RuntimeReplaced seen while `generation` was current: wait until that runtime is gone and
        its replacement ready, up to `deadline` (loop time); RuntimeError naming why if it does not come.
        A frontend that is stopping does not wait: its work fails with SHUTTING_DOWN."""
        if self.stopping():
            raise ShuttingDown(SHUTTING_DOWN)
        loop = asyncio.get_running_loop()
        while self.generation == generation and loop.time() < deadline:
            await asyncio.sleep(0.05)  # the supervisor's PeerDown is on its way
        if not await self.requester.wait_up(deadline - loop.time()):
            raise RuntimeError("the server's block runtime restarted and was not back in time; retry")

    async def call_surviving(self, make: Callable[[], Message], tensors: Sequence[RawTensor], timeout: float):
        """`call`, sent again to the runtime's replacement if the runtime is replaced meanwhile."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            generation = self.generation
            left = deadline - asyncio.get_running_loop().time()
            try:
                return await self.call(make(), tensors, max(0.001, left))
            except RuntimeReplaced:
                await self.back(generation, deadline)
