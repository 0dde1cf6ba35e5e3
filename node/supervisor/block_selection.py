"""Which blocks a server should hold, and when it should move (PROTOCOL 5.1): the Petals rule.

Pure functions over what the DHT says (spans of servers and their throughputs): no network, no
clock. The supervisor reads the swarm through the announcer, calls these, and decides; its own
safeguards against needless moves (an imbalance must persist, a move must change the span) live
with it, not here, so that these stay the rule every Petals server applies.
"""

from __future__ import annotations

import random
from typing import Mapping, Optional, Sequence

from protocol.dht_records import ServerInfo, ServerState, SpanInfo, compute_spans

EPS = 1e-3


def block_throughputs(spans: Mapping[str, SpanInfo], num_blocks: int) -> list[float]:
    """Sum of the throughput of the servers covering each block, peers added in PeerID order."""
    throughputs = [0.0] * num_blocks
    for peer in sorted(spans):
        span = spans[peer]
        for block in range(max(span.start, 0), min(span.end, num_blocks)):
            throughputs[block] += span.info.throughput
    return throughputs


def best_start(throughputs: Sequence[float], length: int) -> int:
    """The window of `length` blocks whose sorted throughputs are lexicographically smallest:
    the weakest block first, then the next weakest; ties go to the earlier window."""
    if not 0 < length <= len(throughputs):
        raise ValueError(f"cannot place {length} blocks in a model of {len(throughputs)}")
    # Only windows holding the lowest minimum can win, and sorting the others is most of the cost
    # (a simulated swarm of a thousand servers asks this a great many times).
    lows = [min(throughputs[s : s + length]) for s in range(len(throughputs) - length + 1)]
    lowest = min(lows)
    options = [(sorted(throughputs[s : s + length]), s) for s, low in enumerate(lows) if low == lowest]
    return min(options)[1]


def choose_best_blocks(
    num_blocks: int, infos: Mapping[int, Mapping[str, ServerInfo]], total_blocks: int
) -> tuple[int, int]:
    """Where a joining server with room for `num_blocks` helps most (servers JOINING count too)."""
    return best_blocks(num_blocks, compute_spans(_complete(infos, total_blocks), ServerState.JOINING), total_blocks)


def best_blocks(
    num_blocks: int, spans: Mapping[str, SpanInfo], total_blocks: int, throughputs: Optional[Sequence[float]] = None
) -> tuple[int, int]:
    """choose_best_blocks over spans already computed (JOINING and ONLINE servers); `throughputs`, when
    given, must be block_throughputs(spans, total_blocks): a caller asking often keeps it."""
    if throughputs is None:
        throughputs = block_throughputs(spans, total_blocks)
    start = best_start(throughputs, num_blocks)
    return start, start + num_blocks


def should_choose_other_blocks(
    local_peer: str,
    infos: Mapping[int, Mapping[str, ServerInfo]],
    total_blocks: int,
    balance_quality: float,
    rng: Optional[random.Random] = None,
) -> bool:
    """True when moving this server would raise the swarm's weakest block enough (should_move)."""
    if balance_quality > 1.0:
        return True  # forced moves, for debugging
    spans = compute_spans(_complete(infos, total_blocks), min_state=ServerState.JOINING)
    return should_move(local_peer, spans, total_blocks, balance_quality, rng)


def should_move(
    local_peer: str,
    spans: Mapping[str, SpanInfo],
    total_blocks: int,
    balance_quality: float,
    rng: Optional[random.Random] = None,
    throughputs: Optional[Sequence[float]] = None,
) -> bool:
    """should_choose_other_blocks over spans already computed: the servers are re-placed one by one
    (this one first) until none moves, and the move is worth it when the weakest throughput grows by
    more than 1/balance_quality. `throughputs` as in best_blocks."""
    if balance_quality > 1.0:
        return True  # forced moves, for debugging
    if local_peer not in spans:
        raise ValueError(f"this server ({local_peer}) is not in the swarm's records")
    throughputs = list(throughputs) if throughputs is not None else block_throughputs(spans, total_blocks)
    initial = min(throughputs)
    if cannot_gain(throughputs, balance_quality):
        return False
    rng = rng or random.Random()

    local = spans[local_peer]
    _add(throughputs, local.start, local.end, -local.info.throughput * (1 + EPS))
    if initial > EPS and min(throughputs) <= 0:
        return False  # leaving would disconnect the swarm
    new_start = best_start(throughputs, local.length)
    if new_start == local.start:
        return False
    _add(throughputs, local.start, local.end, local.info.throughput * EPS)
    _add(throughputs, new_start, new_start + local.length, local.info.throughput)
    positions = {peer: span.start for peer, span in spans.items()}
    positions[local_peer] = new_start

    moved = True
    while moved:
        moved = False
        # a record any peer wrote may publish a span of no blocks (start_block == end_block) or more than the
        # model: it cannot be placed anywhere, and best_start refused it (which ended every later check)
        peers = sorted(peer for peer, span in spans.items() if 0 < span.length <= total_blocks)
        rng.shuffle(peers)
        for peer in peers:
            span, start = spans[peer], positions[peer]
            throughput = span.info.throughput
            _add(throughputs, start, start + span.length, -throughput * (1 + EPS))
            new_start = best_start(throughputs, span.length)
            _add(throughputs, start, start + span.length, throughput * EPS)
            if new_start != start:
                positions[peer] = new_start
                moved = True
            _add(throughputs, positions[peer], positions[peer] + span.length, throughput)

    new = min(throughputs)
    if new < initial or new < EPS:
        return False
    return initial / new < balance_quality - EPS


def cannot_gain(throughputs: Sequence[float], balance_quality: float) -> bool:
    """An exact shortcut: re-placing servers keeps the sum of the throughputs, so the weakest block can
    never end above the mean; when the weakest is already within balance_quality of the mean, no
    re-placement can be worth a move, and the costly search is skipped (the margin covers rounding)."""
    mean = sum(throughputs) / len(throughputs)
    return min(throughputs) >= (balance_quality - EPS) * mean * (1 + 1e-9)


def _add(throughputs: list[float], start: int, end: int, value: float) -> None:
    for block in range(start, end):
        throughputs[block] += value


def _complete(infos: Mapping[int, Mapping[str, ServerInfo]], total_blocks: int) -> dict:
    """compute_spans walks the looked-up range: make it the whole model, empty blocks included."""
    return {block: dict(infos.get(block, {})) for block in range(total_blocks)}
