"""A block runtime of rank K > 0 in the node's tensor-parallel group (`python -m procs.runtime_rank
RUN_DIR runtime.K`).

Owns: the engine of node/runtime/tensor_parallel/rank.py (its shard of every block, on the K-th device of
  --tensor_parallel_devices, and the K/V tensors of its heads for every open session, by cache handle).
Receives (PULL `tp.K.sock`, from rank 0 only): GroupRun (a batched pass; caches are made on first
  sight, reordered when rank 0 reordered them), GroupBackward, GroupDrop and GroupStop. Control:
  LoadBlocks (load the shard; the plan names the blocks), Stop.
Sends: nothing but the reductions inside its blocks (torch.distributed) and, like every actor, Ready
  and heartbeats. It validates nothing: rank 0 checked every request before pushing it. Any failure
  here ends the process, and the supervisor restarts the whole group (its peers cannot go on alone).
"""

from __future__ import annotations

from node import startup

startup.die_with_supervisor()
startup.runtime_imports()  # before the imports below: see node/startup.py

import os
import time

import torch

from node import logs
from node.runtime import linear
from node.runtime.tensor_parallel.group import Group, rank_of
from node.runtime.tensor_parallel.rank import RankEngine
from procs import actor as actor_lib
from procs.runtime_start import load_or_fail, wait_for_load_order
from protocol.messages import GroupStop, RuntimeReady
from protocol.transport import BadMessage


def serve(actor: actor_lib.Actor, engine: RankEngine, group: Group) -> None:
    plan = actor.plan
    actor.ready(
        RuntimeReady(
            blocks=(plan.start_block, plan.end_block), dtype=plan.torch_dtype, rank=group.rank, device=str(group.device)
        )
    )
    while not actor.stopping.is_set():
        if group.inbox.sock.poll(100):
            try:
                envelope = group.inbox.recv()
            except BadMessage as e:  # cannot happen between our own processes; if it does, we are out of step
                raise RuntimeError(f"unreadable message from rank 0: {e.reason}") from None
            if isinstance(envelope.msg, GroupStop):
                break
            engine.take(envelope.msg, envelope.frames)
        actor.stats = engine.stats()
        actor.publish_stats()


def main(actor: actor_lib.Actor) -> None:
    torch.set_grad_enabled(False)
    logs.route_transformers_logs()
    rank = rank_of(actor.name)
    actor.plan.device = actor.plan.tensor_parallel_devices[rank]
    # the products timed before, by any rank (every rank's shards have the same shapes; procs/runtime.py)
    linear.remember(os.path.join(actor.plan.run_dir, "linear_choices.json"))
    if not wait_for_load_order(actor):
        return
    began = time.perf_counter()
    group = Group(actor.plan, rank, actor.ctx, timeout=max(60.0, actor.plan.request_timeout))
    blocks = load_or_fail(actor, group, began)
    if blocks is None:
        return
    serve(actor, RankEngine(actor.plan, blocks, group.device), group)
    group.close()


if __name__ == "__main__":
    actor_lib.run(main)
