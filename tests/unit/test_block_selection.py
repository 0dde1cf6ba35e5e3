"""The Petals block-selection and rebalancing rule (PROTOCOL 5.1), on hand-made swarms."""

from __future__ import annotations

import random

import pytest

from node.supervisor import placement_rules
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


def checks_until_a_move(infos, needed: int) -> int:
    """How many balance checks in a row A makes, on this swarm, before it moves."""
    view = placement_rules.Swarm.from_infos(infos, 8)
    streak = 0
    for check in range(1, needed + 2):
        target = placement_rules.balance_target("A", (0, 4), 4, view, 0.75, random.Random(0))
        streak, move = placement_rules.after_check(streak, target, needed, view.has_hole())
        if move is not None:
            assert move == (4, 8)
            return check
    raise AssertionError("no move")


def test_a_block_nobody_serves_is_filled_after_one_check_otherwise_after_balance_checks():
    # blocks 4-7 have no server: waiting for more checks only keeps every client out
    assert checks_until_a_move(swarm(("A", 0, 4, 1.0), ("B", 0, 4, 1.0)), needed=3) == 1
    # an OFFLINE server is leaving: the hole is there all the same
    assert checks_until_a_move(swarm(("A", 0, 4, 1.0), ("B", 0, 4, 1.0), ("C", 4, 8, 1.0, ServerState.OFFLINE)), 3) == 1
    # a weak server covers them (ONLINE or still JOINING): the imbalance must persist as before
    assert checks_until_a_move(swarm(("A", 0, 4, 1.0), ("B", 0, 4, 1.0), ("C", 4, 8, 0.1)), needed=3) == 3
    assert checks_until_a_move(swarm(("A", 0, 4, 1.0), ("B", 0, 4, 1.0), ("C", 4, 8, 0.1, ServerState.JOINING)), 2) == 2


def test_a_record_of_no_blocks_does_not_stop_the_balance_checks():
    """Any peer may publish start_block == end_block: its span of no blocks made best_start refuse, which
    ended the balance task for good (Petals' own check ignores it)."""
    infos = swarm(("A", 0, 4, 1.0), ("B", 0, 4, 1.0))
    infos[1]["C"] = ServerInfo(state=ServerState.ONLINE, throughput=0.5, start_block=1, end_block=1)
    assert should_choose_other_blocks("A", infos, 8, 0.75, random.Random(0))
