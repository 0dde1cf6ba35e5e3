"""The simulated swarm: virtual servers, what the DHT says about them, and what they really serve.

The two differ on purpose. The DHT holds each server's last announcement until it expires: a crashed
server's record lingers (it was refreshed every update period, and lives `expiration` seconds after
the last refresh), and the rules choose from these records. What clients get is the truth: the blocks
of servers that are up and ONLINE. The swarm's throughput is measured on the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from node.supervisor import block_selection
from node.supervisor.placement_rules import Swarm
from protocol.dht_records import ServerInfo, ServerState, SpanInfo

Range = tuple[int, int]


@dataclass(eq=False)
class Server:
    peer: str  # its peer id: the node's tie-breaks compare them
    rule: str  # "node" or "petals"
    device: str
    count: int  # blocks it holds
    throughput: float  # what it announces
    free_bytes: float  # device memory beside its blocks: room to load new ones before switching
    joined: float
    epoch: int = 0  # bumped when it leaves: its pending events are dropped
    blocks: Optional[Range] = None  # the range it holds or is loading
    state: ServerState = ServerState.OFFLINE  # what it announced last
    alive: bool = True
    moving: bool = False
    streak: int = 0
    chain: int = 0  # the current run of balance checks (a Petals server starts one each time it is ONLINE)
    checking: bool = False  # the node's one loop of balance checks has started
    announced_at: Optional[float] = None  # its records are refreshed every update period from here
    left: Optional[float] = None
    pending: bool = False  # a move began and has not landed yet
    held: list = field(default_factory=list)  # ranges it served, in order
    moves: list = field(default_factory=list)  # times a move began
    sessions: set = field(default_factory=set)


class Dht:
    """Every peer's records as a lookup of the whole model would merge them, kept as the rules'
    Swarm view (spans, ranges, per-block throughputs) and updated record by record."""

    RESUM_EVERY = 500  # changes between exact sums: added and subtracted floats drift by rounding

    def __init__(self, total: int):
        self.total = total
        self.view = Swarm(total, spans={}, ranges={}, cached=[0.0] * total)
        self.main: dict[str, tuple] = {}  # peer -> (state, start, end, throughput, version)
        self.retired: dict[str, dict[Range, int]] = {}  # peer -> {OFFLINE range: version}
        self.versions = 0
        self.changes = 0

    def publish(self, peer: str, state: ServerState, blocks: Range, throughput: float) -> int:
        """A new announcement replaces the last one; returns its version (an expiry names it)."""
        self._unspan(peer)
        self.versions += 1
        self.main[peer] = (state, blocks[0], blocks[1], throughput, self.versions)
        self.retired.get(peer, {}).pop(tuple(blocks), None)
        if state >= ServerState.JOINING:
            info = ServerInfo(state=state, throughput=throughput, start_block=blocks[0], end_block=blocks[1])
            self.view.spans[peer] = SpanInfo(blocks[0], blocks[1], info)
            self._add(blocks, throughput)
        self._ranges(peer)
        return self.versions

    def retire(self, peer: str, blocks: Range) -> int:
        """The old range of a server that switched, announced OFFLINE (never refreshed: it expires)."""
        self.versions += 1
        self.retired.setdefault(peer, {})[tuple(blocks)] = self.versions
        self._ranges(peer)
        return self.versions

    def expire(self, peer: str, version: int) -> None:
        main = self.main.get(peer)
        if main is not None and main[4] == version:
            self._unspan(peer)
            del self.main[peer]
        retired = self.retired.get(peer, {})
        for blocks, v in list(retired.items()):
            if v == version:
                del retired[blocks]
        self._ranges(peer)

    def _unspan(self, peer: str) -> None:
        span = self.view.spans.pop(peer, None)
        if span is not None:
            self._add((span.start, span.end), -span.info.throughput)

    def _add(self, blocks: Range, throughput: float) -> None:
        cached = self.view.cached
        for block in range(*blocks):
            cached[block] += throughput
        self.changes += 1
        if self.changes % self.RESUM_EVERY == 0:
            self.view.cached = block_selection.block_throughputs(self.view.spans, self.total)

    def _ranges(self, peer: str) -> None:
        ranges = {(ServerState.OFFLINE, a, b) for (a, b) in self.retired.get(peer, {})}
        if peer in self.main:
            state, a, b, _, _ = self.main[peer]
            ranges.add((state, a, b))
        if ranges:
            self.view.ranges[peer] = ranges
        else:
            self.view.ranges.pop(peer, None)


class Truth:
    """What is really served: per-block throughput of the servers up and ONLINE, who covers each
    block (for clients' routes), and the ideal (all servers up, perfectly spread)."""

    def __init__(self, total: int):
        self.total = total
        self.online = [0.0] * total
        self.covering: list[dict] = [{} for _ in range(total)]  # insertion-ordered: runs repeat
        self.capacity = 0.0  # sum of throughput x blocks of the servers up
        self.serving: dict[Server, Range] = {}

    def serve(self, server: Server, blocks: Optional[Range]) -> None:
        """The range this server takes new requests on now (None: none)."""
        old = self.serving.pop(server, None)
        if old is not None:
            for block in range(*old):
                self.online[block] -= server.throughput
                self.covering[block].pop(server, None)
        if blocks is not None:
            self.serving[server] = blocks
            for block in range(*blocks):
                self.online[block] += server.throughput
                self.covering[block][server] = None

    def up(self, server: Server, sign: int) -> None:
        self.capacity += sign * server.throughput * server.count

    def fraction(self) -> float:
        """The swarm's throughput (its weakest block) as a share of the ideal."""
        ideal = self.capacity / self.total
        return max(min(self.online), 0.0) / ideal if ideal > 0 else 0.0

    def uncovered(self) -> bool:
        return min(self.online) <= 1e-9
