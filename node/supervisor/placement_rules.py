"""The decisions of node/supervisor/placement.py as pure functions of a swarm view: no IO, no clock.

Placement reads the swarm through the announcer and calls these; node/simulate calls the same ones on
a simulated swarm, so that what the simulation measures is the node's own rule, not a copy of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping, Optional

from node.supervisor import block_selection
from protocol.dht_records import ServerInfo, ServerState, SpanInfo, compute_spans

Range = tuple[int, int]


@dataclass
class Swarm:
    """What one read of the DHT says: the spans of the JOINING and ONLINE servers (as the rule counts
    them) and every range each peer announced, with its state (the OFFLINE ones tell who is leaving)."""

    total: int
    spans: dict[str, SpanInfo]
    ranges: dict[str, set[tuple[ServerState, int, int]]] = field(default_factory=dict)
    cached: Optional[list[float]] = None  # block_throughputs(spans): a simulator reuses it between reads

    @classmethod
    def from_infos(cls, infos: Mapping[int, Mapping[str, ServerInfo]], total: int) -> "Swarm":
        complete = {b: dict(infos.get(b, {})) for b in range(total)}
        ranges: dict[str, set] = {}
        for peers in complete.values():
            for peer, info in peers.items():
                if info.start_block is not None and info.end_block is not None:
                    ranges.setdefault(peer, set()).add((info.state, info.start_block, info.end_block))
        return cls(total, compute_spans(complete, min_state=ServerState.JOINING), ranges)

    def throughputs(self) -> list[float]:
        if self.cached is None:
            self.cached = block_selection.block_throughputs(self.spans, self.total)
        return self.cached

    def has_hole(self) -> bool:
        """A block that no JOINING or ONLINE server holds: every request through the model fails until
        someone loads it."""
        return min(self.throughputs(), default=0.0) <= 0

    def without(self, peer: str) -> "Swarm":
        """The swarm as if this peer were gone: where it would go is chosen without itself."""
        spans = {p: s for p, s in self.spans.items() if p != peer}
        return Swarm(self.total, spans, {p: r for p, r in self.ranges.items() if p != peer})

    def visible(self, peer: str) -> bool:
        return peer in self.spans

    def peers_on(self, blocks: Range, leaving: bool) -> list[str]:
        """Peers that announced exactly these blocks, OFFLINE (leaving) or not, in peer id order."""
        return sorted(
            p
            for p, ranges in self.ranges.items()
            if any((state == ServerState.OFFLINE) == leaving and (a, b) == tuple(blocks) for state, a, b in ranges)
        )


def balance_target(
    peer: str, current: Range, count: int, swarm: Swarm, balance_quality: float, rng: random.Random
) -> Optional[Range]:
    """What one balance check sees: the span to move to, or None (balanced, or the best place for this
    server is where it is: the target is chosen with the server taken out, and must differ)."""
    if not block_selection.should_move(peer, swarm.spans, swarm.total, balance_quality, rng, swarm.throughputs()):
        return None
    target = block_selection.best_blocks(count, swarm.without(peer).spans, swarm.total)
    return None if target == tuple(current) else target


def after_check(streak: int, target: Optional[Range], needed: int, hole: bool) -> tuple[int, Optional[Range]]:
    """The hysteresis: a move needs the imbalance in `needed` consecutive checks, so a passing one (a
    server restarting, a record not yet refreshed) moves nobody. Where the swarm has a hole (see
    Swarm.has_hole) one check is enough: no client gets through the model meanwhile, and waiting cost
    the small swarm of docs/placement.md more than the moves it spared. Returns the new streak and the
    move."""
    if target is None:
        return 0, None
    streak += 1
    if streak < needed and not hole:
        return streak, None
    return 0, target


def confirm_move(peer: str, old: Range, target: Range, count: int, swarm: Swarm) -> Optional[Range]:
    """Once our old blocks are OFFLINE and drained: where to go now, or None to stay. Two nodes on one
    span may decide together; each then sees the other gone from the span, and the best place for
    either is the old span. The one with the lower peer id stays there, the other moves."""
    now = block_selection.best_blocks(count, swarm.without(peer).spans, swarm.total)
    if now != tuple(old):
        return now
    leaving = swarm.without(peer).peers_on(old, leaving=True)
    if leaving and leaving[0] < peer:
        return tuple(target)
    return None


def confirm_switch(peer: str, old: Range, target: Range, count: int, swarm: Swarm) -> Optional[Range]:
    """The new blocks are loaded: the target if it is still the best place (another node may have moved
    there meanwhile), else None. Our old range is still announced, as in balance_target."""
    now = block_selection.best_blocks(count, swarm.without(peer).spans, swarm.total)
    if now != tuple(target) or now == tuple(old):
        return None
    return now


def switched_together(peer: str, old: Range, new: Range, count: int, swarm: Swarm) -> bool:
    """Right after a switch: did another node leave our old blocks for our new ones at the same moment?
    Then the one with the lower peer id keeps the move and the other goes back."""
    others = swarm.without(peer)
    if block_selection.best_blocks(count, others.spans, swarm.total) != tuple(old):
        return False
    return any(p < peer for p in others.peers_on(new, leaving=False))
