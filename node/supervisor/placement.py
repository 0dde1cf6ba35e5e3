"""Where the node sits in the swarm: how many blocks, which ones, what it is worth, and when to move.

Owned by the supervisor. Receives the runtime's Measured report and the announcer's SwarmViews (it
asks for them with SwarmQuery); decides with node/supervisor/resources.py (how many blocks fit) and
node/supervisor/block_selection.py (the Petals rule), through node/supervisor/placement_rules.py (each decision
as a pure function of a swarm view, which node/simulate runs too); tells the supervisor the range and the
ServerInfo numbers.

Rebalancing improves on Petals where its users suffer:
- a move needs the imbalance in `--balance_checks` consecutive checks, so a passing one (a server
  restarting, a record not yet refreshed) moves nobody, unless a block has no server at all: then
  one check moves;
- a move must change the span: the target is chosen with this node taken out of the swarm, and a
  target equal to the current span is no move;
- open sessions get up to `--drain_timeout` seconds on the old blocks (announced OFFLINE, so that no
  new session comes) before the runtime is restarted on the new ones.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Optional

from node.allocator import budget
from node.supervisor import block_selection, placement_rules, resources
from protocol.messages import Measured, SwarmQuery, SwarmView


class PlacementError(Exception):
    """The node cannot be placed (no memory for a block, no swarm view): it stops with this message."""


class Placement:
    def __init__(self, config, plan, log, ask_announcer, rng: Optional[random.Random] = None):
        self.config = config
        self.plan = plan
        self.log = log
        self.ask_announcer = ask_announcer  # sends a SwarmQuery to the announcer; False if it is down
        self.rng = rng or random.Random()
        self.measured: Optional[Measured] = None
        self.block_bytes = 0  # one block's weights as served, from the measured parameters (PROTOCOL 5.4)
        self.measured_event = asyncio.Event()
        self.views: dict[int, asyncio.Future] = {}
        self.reqs = itertools.count(1)
        self.placed = False  # the range is chosen (or fixed) and the ServerInfo numbers known
        self.count = plan.end_block - plan.start_block
        self.numbers: dict = dict(throughput=float(plan.throughput))
        self.using_relay = False  # the announcer found that only relays reach us (PROTOCOL 5.10)
        self.streak = 0  # consecutive balance checks that wanted a move
        self.moves = 0

    # --- receiving ---------------------------------------------------------------------------

    def on_measured(self, msg: Measured) -> None:
        if self.measured is None:
            self.log.info("device measured", **{f: getattr(msg, f) for f in msg.__struct_fields__})
        if msg.quant_type != self.plan.quant_type:
            self.log.warning(
                "the runtime serves another quantization than planned",
                planned=self.plan.quant_type,
                served=msg.quant_type,
            )
            self.plan.quant_type = msg.quant_type
        self.measured = msg
        self.block_bytes = resources.block_size_bytes(msg.block_params, self.plan.torch_dtype, msg.quant_type)
        self.measured_event.set()

    def on_view(self, msg: SwarmView) -> None:
        future = self.views.pop(msg.req, None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def swarm(self, timeout: float = 30.0) -> dict:
        """{block: {peer: ServerInfo}} for every block of the model, read through the announcer."""
        req = next(self.reqs)
        future = asyncio.get_running_loop().create_future()
        self.views[req] = future
        if not self.ask_announcer(SwarmQuery(req)):
            self.views.pop(req, None)
            raise PlacementError("the announcer is not running")
        try:
            view = await asyncio.wait_for(future, timeout)
        finally:
            self.views.pop(req, None)
        if view.error:
            raise PlacementError(f"cannot read the swarm: {view.error}")
        return {int(block): dict(peers) for block, peers in view.blocks.items()}

    # --- deciding ----------------------------------------------------------------------------

    async def place(self) -> tuple[int, int]:
        """Before the first announcement: how many blocks, what they are worth, and which ones."""
        await self.measured_event.wait()
        plan, report = self.plan, self.measured
        if plan.choose_blocks:
            self.count = plan.wanted_blocks or self.estimate(report).num_blocks
        self.numbers = self.server_numbers(report)
        if plan.choose_blocks:
            start, end = await self.choose()
        else:
            start, end = plan.start_block, plan.end_block
        self.placed = True
        return start, end

    def estimate(self, report: Measured) -> resources.Estimate:
        plan = self.plan
        estimate = resources.estimate_num_blocks(
            device_type=report.device_type,
            device_memory=report.device_memory,
            available_memory=report.available_memory,
            block_bytes=self.block_bytes,
            cache_bytes=budget.cache_bytes_per_block(
                plan.hidden_size, plan.attn_cache_tokens, plan.kv_groups, resources.DTYPE_BYTES[plan.torch_dtype]
            ),
            adapter_bytes=report.adapter_bytes,
            history_bytes=self.history_bytes_per_block(),
            history_fixed=plan.history_bytes or 0,
            hidden_size=plan.hidden_size,
            total_blocks=plan.total_blocks,
            num_devices=report.num_devices,
            margin=self.config.memory_margin,
        )
        self.log.info("number of blocks chosen from memory", **estimate.fields())
        return estimate

    def history_bytes_per_block(self) -> int:
        plan = self.plan
        if plan.history_bytes is not None:  # --history_bytes: a fixed amount, whatever the number of blocks
            return 0
        dtype_bytes = resources.DTYPE_BYTES[plan.torch_dtype]
        return budget.history_bytes_per_block(plan.hidden_size, plan.attn_cache_tokens, dtype_bytes)

    def server_numbers(self, report: Measured) -> dict:
        """The ServerInfo figures: a stated throughput alone, or the measured one and its parts."""
        if self.plan.throughput_mode == "fixed":
            return dict(throughput=float(self.plan.throughput), quant_type=self.plan.quant_type)
        info = dict(inference_rps=report.inference_rps, forward_rps=report.forward_rps, network_rps=report.network_rps)
        announced = server_throughput(info, self.count, using_relay=self.using_relay)
        return dict(
            throughput=float(announced), quant_type=self.plan.quant_type, **{k: float(v) for k, v in info.items()}
        )

    async def choose(self) -> tuple[int, int]:
        total = self.plan.total_blocks
        if self.count >= total:
            return 0, total  # one place only: nothing to wait for or to read
        delay = self.rng.uniform(0, 2 * self.config.mean_block_selection_delay)
        self.log.info("choosing blocks", num_blocks=self.count, delay=round(delay, 2))
        await asyncio.sleep(delay)  # nodes that start together must not all read the same swarm
        infos = await self.swarm()
        start, end = block_selection.choose_best_blocks(self.count, infos, total)
        self.log.info(
            "blocks chosen", blocks=[start, end], swarm=_summary(placement_rules.Swarm.from_infos(infos, total))
        )
        return start, end

    async def read(self) -> placement_rules.Swarm:
        return placement_rules.Swarm.from_infos(await self.swarm(), self.plan.total_blocks)

    async def check_balance(self, peer_id: str, current: tuple[int, int]) -> Optional[tuple[int, int]]:
        """One balance check: the span to move to once the imbalance has persisted, else None."""
        swarm = await self.read()
        if not swarm.visible(peer_id):
            self.log.info("balance check skipped: our records are not visible yet")
            self.streak = 0
            return None
        target = placement_rules.balance_target(
            peer_id, current, self.count, swarm, self.config.balance_quality, self.rng
        )
        streak = self.streak
        hole = swarm.has_hole()
        self.streak, move = placement_rules.after_check(streak, target, self.config.balance_checks, hole)
        if target is None:
            if streak:
                self.log.info("imbalance passed", checks=streak)
            return None
        self.log.info(
            "swarm unbalanced",
            checks=streak + 1,
            needed=1 if hole else self.config.balance_checks,
            blocks=list(current),
            target=list(target),
            swarm=_summary(swarm),
        )
        return move

    async def confirm_move(
        self, peer_id: str, old: tuple[int, int], target: tuple[int, int]
    ) -> Optional[tuple[int, int]]:
        """Once our old blocks are OFFLINE and drained: is the move still right (placement_rules.confirm_move)?"""
        swarm = await self.read()
        now = placement_rules.confirm_move(peer_id, old, target, self.count, swarm)
        self.log.info("move confirmed" if now is not None else "move not needed now", old=list(old), now=now)
        return now

    async def confirm_switch(
        self, peer_id: str, old: tuple[int, int], target: tuple[int, int]
    ) -> Optional[tuple[int, int]]:
        """The new blocks are loaded: is the target still the best place (placement_rules.confirm_switch)?"""
        now = placement_rules.confirm_switch(peer_id, old, target, self.count, await self.read())
        if now is None:
            self.log.info("move no longer needed", target=list(target))
        return now

    async def switched_together(self, peer_id: str, old: tuple[int, int], new: tuple[int, int]) -> bool:
        """Right after a switch: did another node take our new blocks from our old ones at the same moment?"""
        return placement_rules.switched_together(peer_id, old, new, self.count, await self.read())

    def next_check_in(self) -> float:
        return self.rng.uniform(0, 2 * self.config.mean_balance_check_period)

    @property
    def can_move(self) -> bool:
        return self.plan.choose_blocks and self.count < self.plan.total_blocks


RELAY_PENALTY = 0.2  # a relayed server gets a fifth of its bandwidth's worth (PROTOCOL 5.2)


def server_throughput(info: dict, num_blocks: int, using_relay: bool) -> float:
    """What the server announces: a request uses (num_blocks + 1) / 2 of its blocks on average, and
    the network caps it."""
    compute = info["forward_rps"] / ((num_blocks + 1) / 2)
    return min(compute, info["network_rps"] * (RELAY_PENALTY if using_relay else 1.0))


def _summary(swarm: placement_rules.Swarm) -> list[float]:
    """Throughput per block as the rule sees it (JOINING and ONLINE servers), for the logs."""
    return [round(t, 3) for t in swarm.throughputs()]
