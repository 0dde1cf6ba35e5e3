"""The bench's multi-session client computes one LM head for the sessions whose replies came together
(node/client/generate.py BatchedHead), so that their next steps reach the node in time for one round."""

from __future__ import annotations

import asyncio

import torch

from node.client.generate import BatchedHead


class CountingHead:
    def __init__(self):
        self.batches: list[int] = []

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.batches.append(hidden.shape[0])
        return hidden * 2


def test_replies_of_one_round_share_one_head_even_in_different_loop_turns():
    head = CountingHead()
    batched = BatchedHead(head, window=5.0)

    async def session(i: int, delay: float) -> torch.Tensor:
        await asyncio.sleep(delay)  # its reply arrives a little after the others'
        return await batched.logits(torch.full((1, 1, 2), float(i)))

    async def main():
        for _ in range(3):
            batched.join()
        return await asyncio.gather(session(0, 0.0), session(1, 0.01), session(2, 0.02))

    outputs = asyncio.run(main())
    assert head.batches == [3]  # all three joined sessions waited: computed at once, not after the window
    assert [float(o[0, 0, 0]) for o in outputs] == [0.0, 2.0, 4.0]


def test_a_late_session_does_not_hold_the_others_beyond_the_window():
    head = CountingHead()
    batched = BatchedHead(head, window=0.05)

    async def main():
        batched.join()
        batched.join()  # this one never asks
        out = await asyncio.wait_for(batched.logits(torch.ones(1, 1, 2)), 5)
        batched.leave()
        return out

    assert float(asyncio.run(main())[0, 0, 0]) == 2.0 and head.batches == [1]


def test_a_session_leaving_releases_those_waiting_for_it():
    head = CountingHead()
    batched = BatchedHead(head, window=5.0)

    async def main():
        batched.join()
        batched.join()
        waiting = asyncio.ensure_future(batched.logits(torch.ones(1, 1, 2)))
        await asyncio.sleep(0.01)
        batched.leave()  # the other session ended: nobody else to wait for
        return await asyncio.wait_for(waiting, 1)

    assert float(asyncio.run(main())[0, 0, 0]) == 2.0 and head.batches == [1]
