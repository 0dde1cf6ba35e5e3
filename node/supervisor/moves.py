"""Rebalancing moves: when the swarm is unbalanced, the node takes other blocks (PROTOCOL 5.1).

Owned by the supervisor; the decisions (whether to move, where to) are node/supervisor/placement.py's,
and this module is the choreography that carries one out without losing a session:
- load-then-switch, when the new blocks fit beside the old: the runtime loads them while serving,
  the node announces the new range ONLINE and the old OFFLINE at once, the old sessions finish on the
  old blocks (bounded by --drain_timeout), then the old blocks are dropped;
- drain-and-restart otherwise (and always for a tensor-parallel group): OFFLINE on the old blocks,
  open sessions finish (bounded), the runtimes restart on the new range, JOINING, then ONLINE.
Two nodes deciding together are told apart by peer id, so exactly one of them moves.
Receives BlocksLoaded (through the supervisor); reads the runtime's and the allocator's heartbeat stats.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Optional

from node.supervisor.placement import PlacementError
from protocol.dht_records import ServerState
from protocol.messages import AllocatorStats, BlocksLoaded, DropBlocks, LoadBlocks, PeerDown, RuntimeStats, Stop

if TYPE_CHECKING:
    from node.supervisor.supervisor import Supervisor


FREE_MEMORY_WAIT = 5.0  # seconds a move waits for the runtime's first report of its free memory


class Moves:
    def __init__(self, sup: "Supervisor"):
        self.sup = sup
        self.moving = False  # a move is under way: it drives the node's state itself
        self.loaded: Optional[asyncio.Future] = None  # BlocksLoaded of a load-then-switch move
        self.loading: Optional[tuple[int, int]] = None  # ... and the blocks it asked for

    @property
    def plan(self):
        return self.sup.plan

    @property
    def log(self):
        return self.sup.log

    @property
    def placement(self):
        return self.sup.placement

    @property
    def config(self):
        return self.sup.config

    def on_loaded(self, msg: BlocksLoaded) -> None:
        """The runtime's answer to our LoadBlocks: only for the blocks this move asked for (a load abandoned
        at its timeout may finish during the next move, and must not pass for that one's)."""
        if (msg.start_block, msg.end_block) != self.loading:
            self.log.info("late load ignored", blocks=[msg.start_block, msg.end_block], ok=msg.ok)
            return
        if self.loaded is not None and not self.loaded.done():
            self.loaded.set_result(msg)

    async def balance(self) -> None:
        """Balance checks at random intervals while ONLINE; a persistent imbalance moves the node."""
        while True:
            await asyncio.sleep(self.placement.next_check_in())
            if self.moving or self.sup.confirmed != ServerState.ONLINE:
                continue
            try:
                target = await self.placement.check_balance(
                    self.plan.peer_id, (self.plan.start_block, self.plan.end_block)
                )
            except (PlacementError, asyncio.TimeoutError) as e:
                self.log.warning("balance check failed", error=str(e) or repr(e))
                continue
            except Exception as e:  # what any peer wrote in the DHT must not end the checks for good
                self.log.error("balance check failed", exc_info=e)
                continue
            if target is not None:
                await self.move(*target)

    async def room_to_load_first(self, start: int, end: int) -> bool:
        """Whether the blocks the move adds fit beside the current ones (free memory, less the margin)."""
        if len(self.sup.runtimes) > 1:
            return False  # a group restarts on its new blocks (its ranks cannot load beside serving in step)
        old = range(self.plan.start_block, self.plan.end_block)
        added = sum(1 for i in range(start, end) if i not in old)
        runtime = self.sup.actors["runtime.0"]
        deadline = time.monotonic() + FREE_MEMORY_WAIT
        while runtime.stats_as(RuntimeStats).free_memory is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # a runtime that just loaded has not said yet how much memory is left
        free = runtime.stats_as(RuntimeStats).free_memory
        report = self.placement.measured
        if free is None or report is None:
            return False
        return added * self.placement.block_bytes <= free * (1.0 - self.config.memory_margin)

    async def move(self, start: int, end: int) -> None:
        if await self.room_to_load_first(start, end):
            await self.switch(start, end)
        else:
            await self.drain_and_restart(start, end)

    async def switch(self, start: int, end: int) -> None:
        """Load-then-switch: the runtime loads the new blocks while it serves the old ones; then the
        node announces the new range ONLINE (the old one OFFLINE) at once, old sessions finish on the
        old blocks (bounded by --drain_timeout), and only then are those freed. No session is lost."""
        old = (self.plan.start_block, self.plan.end_block)
        self.log.info("loading blocks before switching", old=list(old), target=[start, end])
        self.moving = True
        try:
            self.loaded = asyncio.get_running_loop().create_future()
            self.loading = (start, end)
            if not self.sup.send("runtime.0", LoadBlocks(start, end)):
                return
            try:
                loaded = await asyncio.wait_for(self.loaded, self.config.request_timeout)
            except asyncio.TimeoutError:
                loaded = None
            if loaded is None or not loaded.ok:
                self.log.warning(
                    "move abandoned: the new blocks did not load", error=getattr(loaded, "error", "timeout")
                )
                self.sup.send("runtime.0", DropBlocks(*old))
                return
            target = await self.confirmed(self.placement.confirm_switch, old, (start, end))
            if target is None:
                self.sup.send("runtime.0", DropBlocks(*old))
                return
            self.sup.set_blocks(start, end)
            self.sup.announce(ServerState.ONLINE, retire=list(old))
            await asyncio.sleep(1.5)  # a node that switched at the same moment shows up now
            if await self.switched_together(old, (start, end)):
                self.log.info("another node took the same blocks at the same time; switching back", blocks=list(old))
                self.sup.set_blocks(*old)
                self.sup.announce(ServerState.ONLINE, retire=[start, end])
                self.sup.send("runtime.0", DropBlocks(*old))
                return
            await self.drain_outside(self.config.drain_seconds)
            self.sup.send("runtime.0", DropBlocks(start, end))
            self.placement.moves += 1
            self.log.info("moved", old=list(old), blocks=[start, end], moves=self.placement.moves)
            self.sup.write_status()
        finally:
            self.moving = False

    async def confirmed(self, check, old: tuple[int, int], target: tuple[int, int]) -> Optional[tuple[int, int]]:
        """The placement's `check` (confirm_switch or confirm_move): where to go now, or None to stay
        (also when the swarm cannot be read)."""
        try:
            return await check(self.plan.peer_id, old, target)
        except (PlacementError, asyncio.TimeoutError) as e:
            self.log.warning("cannot confirm the move; staying", error=str(e) or repr(e))
            return None

    async def switched_together(self, old: tuple[int, int], new: tuple[int, int]) -> bool:
        try:
            return await self.placement.switched_together(self.plan.peer_id, old, new)
        except (PlacementError, asyncio.TimeoutError):
            return False

    async def drain_outside(self, timeout: float) -> None:
        """Wait until no session uses blocks outside the announced range, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        await asyncio.sleep(min(timeout, 1.5))
        while time.monotonic() < deadline and self.sup.actors["runtime.0"].stats_as(RuntimeStats).sessions_outside:
            await asyncio.sleep(0.2)

    async def drain_and_restart(self, start: int, end: int) -> None:
        """OFFLINE on the old blocks, let open sessions finish (bounded), restart the runtime on the
        new blocks; the usual JOINING -> LoadBlocks -> ONLINE sequence follows."""
        old = (self.plan.start_block, self.plan.end_block)
        self.log.info("leaving blocks", old=list(old), target=[start, end])
        self.moving = True
        try:
            self.sup.announce(ServerState.OFFLINE)
            drained = await self.drain(self.config.drain_seconds)
            confirmed = await self.confirmed(self.placement.confirm_move, old, (start, end))
            if confirmed is None:
                self.log.info("move cancelled: the old blocks are the best place now", blocks=list(old))
                self.sup.announced = None  # ONLINE again on the old blocks, sessions never lost
                return
            start, end = confirmed
            self.placement.moves += 1
            self.log.info("old blocks drained" if drained else "drain timed out; ending open sessions", old=list(old))
            ranks = [self.sup.actors[n] for n in self.sup.runtimes]
            for runtime in ranks:
                runtime.respawn_at = float("inf")  # a planned restart: not a failure, no backoff
            if ranks[0].running and not self.sup.send("runtime.0", Stop(0.0)):
                ranks[0].popen.terminate()
            deadline = time.monotonic() + 5.0
            while ranks[0].running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for runtime in ranks:
                runtime.kill()
                runtime.ready = False
                for name in self.sup.actors:
                    if name not in self.sup.runtimes:
                        self.sup.send(name, PeerDown(runtime.spec.name))
            self.sup.set_blocks(start, end)
            if len(ranks) > 1:
                self.sup.new_group_generation()
            for runtime in ranks:
                runtime.respawn_at = time.monotonic()  # _check spawns it with the new plan
            self.sup.announced = None  # JOINING on the new blocks next
        finally:
            self.moving = False

    async def drain(self, timeout: float) -> bool:
        """Wait until no session holds cache and no task is queued, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        await asyncio.sleep(min(timeout, 1.5))  # the next heartbeats show who came in before OFFLINE
        while time.monotonic() < deadline:
            allocator = self.sup.actors["allocator"].stats_as(AllocatorStats)
            runtime = self.sup.actors["runtime.0"].stats_as(RuntimeStats)
            if not allocator.sessions and not runtime.queue and not runtime.in_progress:
                return True
            await asyncio.sleep(0.2)
        return False
