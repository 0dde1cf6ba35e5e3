"""Round-trip times to the servers that follow ours in a chain: ServerInfo.next_pings (PROTOCOL 2.4).

Clients use them to pick routes. Kept by the announcer: before each refresh it pings up to five
servers of our later blocks and up to five of the block right after our span, and smooths each
peer's time with an exponential average; a failed ping is infinity, and a peer not pinged for
five minutes is forgotten.
"""

from __future__ import annotations

import math
import random
import time
from typing import Mapping, Optional

from protocol.dht_records import ServerInfo, ServerState

MAX_PINGED = 5
ALPHA = 0.2  # weight of the newest round trip
MAX_AGE = 300.0  # seconds


def peers_to_ping(
    infos: Mapping[int, Mapping[str, ServerInfo]], start: int, end: int, me: str, rng: Optional[random.Random] = None
) -> list[str]:
    """Up to 5 random servers of blocks start+1 .. end-1 and up to 5 of block `end`, not us."""
    rng = rng or random.Random()

    def hosts(blocks) -> list[str]:
        found = {p for b in blocks for p, i in infos.get(b, {}).items() if p != me and i.state != ServerState.OFFLINE}
        return sorted(found)

    middle, following = hosts(range(start + 1, end)), hosts([end])
    chosen = rng.sample(middle, min(MAX_PINGED, len(middle))) + rng.sample(following, min(MAX_PINGED, len(following)))
    return list(dict.fromkeys(chosen))


class NextPings:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.rtts: dict[str, tuple[float, float]] = {}  # peer -> (smoothed seconds, when last updated)

    def update(self, peer: str, rtt: float) -> None:
        """rtt = inf for a failed ping. A peer that failed before starts over from its next answer."""
        old = self.rtts.get(peer, (None, 0.0))[0]
        value = rtt if old is None or math.isinf(old) or math.isinf(rtt) else ALPHA * rtt + (1 - ALPHA) * old
        self.rtts[peer] = (value, self.clock())

    def current(self) -> dict[str, float]:
        now = self.clock()
        self.rtts = {p: (v, t) for p, (v, t) in self.rtts.items() if now - t <= MAX_AGE}
        return {p: float(v) for p, (v, _) in self.rtts.items()}
