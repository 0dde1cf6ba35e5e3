"""The bytes a node's process lets requests hold (node/frontend/limits.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from node.frontend.limits import Refused, RequestSizes, Scopes


def plan(blocks: int, **limits) -> SimpleNamespace:
    fields = dict(hidden_size=4096, max_batch_size=2048, start_block=0, end_block=blocks)
    fields.update(max_bytes_in_flight=0, max_peer_bytes_in_flight=0)
    fields.update(limits)
    return SimpleNamespace(**fields)


def test_the_default_limits_follow_the_blocks_served():
    """Every actor starts before the blocks are chosen (0 blocks), and the limits were set then for good: a
    step with deep prompts for every block it serves now could exceed them and be refused at once."""
    chosen = plan(0)
    scopes = Scopes.of(chosen)
    chosen.end_block = 8  # Serve: the blocks were chosen
    largest = RequestSizes.of(chosen).largest
    assert scopes.peer_limit < largest
    scopes.follow(chosen)
    assert (scopes.total_limit, scopes.peer_limit) == (4 * largest, 2 * largest)

    async def reserve():
        await scopes.reserve("peer", largest, wait=0)

    asyncio.run(reserve())
    assert scopes.used == largest


def test_limits_the_operator_set_stay():
    scopes = Scopes.of(plan(0, max_bytes_in_flight=1000, max_peer_bytes_in_flight=500))
    scopes.follow(plan(8, max_bytes_in_flight=1000, max_peer_bytes_in_flight=500))
    assert (scopes.total_limit, scopes.peer_limit) == (1000, 500)

    async def reserve():
        await scopes.reserve("peer", 501, wait=0)

    with pytest.raises(Refused, match="limit of 500 per peer"):
        asyncio.run(reserve())
