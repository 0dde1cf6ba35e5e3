"""How both runtime processes start (procs/runtime.py, procs/runtime_rank.py): wait for the supervisor's
order to load, then load the blocks (node/runtime/loading.py) or tell the supervisor why not.
"""

from __future__ import annotations

import queue
import time
from typing import Optional

from node.runtime.loading import load_blocks
from node.runtime.tensor_parallel.group import Group
from procs.actor import Actor
from protocol.messages import LoadBlocks


def wait_for_load_order(actor: Actor) -> bool:
    """Blocks load only once the swarm sees us JOINING (PROTOCOL 2.4); imports are done meanwhile.
    The order names the blocks: the supervisor may have chosen them after this process started."""
    while not actor.stopping.is_set():
        try:
            msg = actor.control_inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(msg, LoadBlocks):
            if msg.start_block >= 0:
                actor.plan.start_block, actor.plan.end_block = msg.start_block, msg.end_block
            if msg.quant_type and msg.quant_type != actor.plan.quant_type:
                actor.log.info("quantization as measured by rank 0", planned=actor.plan.quant_type, used=msg.quant_type)
                actor.plan.quant_type = msg.quant_type
            return True
    return False


def load_or_fail(actor: Actor, group: Optional[Group], began: float) -> Optional[dict]:
    """The plan's blocks (this rank's shards with a group), or None after telling the supervisor why not."""
    try:
        blocks = load_blocks(actor.plan, actor.log, group=group)
    except Exception as e:
        actor.log.exception("cannot load blocks")
        actor.fatal(f"cannot load blocks {actor.plan.start_block}:{actor.plan.end_block} of {actor.plan.model}: {e}")
        return None
    if group is not None:
        group.barrier()  # every shard is in memory: the node may go ONLINE
    actor.log.info(
        "blocks loaded",
        seconds=round(time.perf_counter() - began, 2),
        count=len(blocks),
        **({"rank": group.rank} if group is not None else {}),
    )
    return blocks
