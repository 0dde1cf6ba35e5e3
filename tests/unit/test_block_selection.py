"""The Petals block-selection and rebalancing rule (PROTOCOL 5.1), on hand-made swarms."""

from __future__ import annotations

import random

import pytest

from node.supervisor.block_selection import (
    best_start,
    block_throughputs,
    choose_best_blocks,
    should_choose_other_blocks,
)
from protocol.dht_records import ServerInfo, ServerState, compute_spans


def swarm(*servers, total=8):
    """servers: (peer, start, end, throughput[, state]) -> the per-block records a DHT lookup gives."""
    infos = {b: {} for b in range(total)}
    for peer, start, end, throughput, *state in servers:
        info = ServerInfo(
            state=state[0] if state else ServerState.ONLINE,
            throughput=float(throughput),
            start_block=start,
            end_block=end,
        )
        for block in range(start, end):
            infos[block][peer] = info
    return infos


def test_best_start_prefers_the_weakest_then_the_earliest():
    assert best_start([0, 0, 0, 0], 2) == 0
    assert best_start([5, 5, 1, 0, 0, 3], 2) == 3
    assert best_start([1, 0, 1, 0, 1], 1) == 1
    with pytest.raises(ValueError):
        best_start([1, 2], 3)


def test_a_new_server_takes_the_least_served_blocks():
    assert choose_best_blocks(4, swarm(total=8), 8) == (0, 4)
    assert choose_best_blocks(4, swarm(("A", 0, 4, 1.0)), 8) == (4, 8)
    assert choose_best_blocks(3, swarm(("A", 0, 8, 1.0), ("B", 2, 5, 2.0)), 8) == (5, 8)
    # JOINING servers count (they are loading those blocks), OFFLINE ones do not
    assert choose_best_blocks(4, swarm(("A", 0, 4, 1.0, ServerState.JOINING)), 8) == (4, 8)
    assert choose_best_blocks(4, swarm(("A", 0, 4, 1.0, ServerState.OFFLINE)), 8) == (0, 4)


def test_throughputs_are_summed_per_block():
    spans = compute_spans(swarm(("A", 0, 4, 1.0), ("B", 2, 6, 0.5)), min_state=ServerState.JOINING)
    assert block_throughputs(spans, 8) == [1.0, 1.0, 1.5, 1.5, 0.5, 0.5, 0.0, 0.0]


def test_two_servers_on_the_same_half_one_should_move():
    infos = swarm(("A", 0, 4, 1.0), ("B", 0, 4, 1.0))
    assert should_choose_other_blocks("A", infos, 8, 0.75, random.Random(0))


def test_a_balanced_swarm_stays():
    infos = swarm(("A", 0, 4, 1.0), ("B", 4, 8, 1.0))
    assert not should_choose_other_blocks("A", infos, 8, 0.75, random.Random(0))
    assert not should_choose_other_blocks("B", infos, 8, 0.75, random.Random(0))


def test_leaving_would_disconnect_the_swarm():
    # B is the only server of blocks 6-7: wherever it might do more good, moving would leave them uncovered
    infos = swarm(("A", 0, 6, 1.0), ("B", 6, 8, 1.0), ("C", 0, 2, 5.0))
    assert not should_choose_other_blocks("B", infos, 8, 0.75, random.Random(0))


def test_a_small_gain_is_not_worth_a_move():
    # moving C would raise the weakest block from 1.0 to 1.1 only: quality 0.91 > 0.75
    infos = swarm(("A", 0, 8, 1.0), ("C", 0, 4, 0.2), ("D", 0, 4, 0.1))
    assert not should_choose_other_blocks("C", infos, 8, 0.75, random.Random(0))
    assert should_choose_other_blocks("C", infos, 8, 0.95, random.Random(0))


def test_balance_quality_above_one_forces_a_move_and_zero_never_moves():
    infos = swarm(("A", 0, 4, 1.0), ("B", 4, 8, 1.0))
    assert should_choose_other_blocks("A", infos, 8, 1.5)
    assert not should_choose_other_blocks("A", swarm(("A", 0, 4, 1.0), ("B", 0, 4, 1.0)), 8, 0.0, random.Random(0))


def test_the_local_server_must_be_announced():
    with pytest.raises(ValueError, match="not in the swarm"):
        should_choose_other_blocks("Z", swarm(("A", 0, 4, 1.0)), 8, 0.75)
