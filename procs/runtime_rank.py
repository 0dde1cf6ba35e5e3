"""A block runtime of rank K > 0 in the node's tensor-parallel group (`python -m procs.runtime_rank
RUN_DIR runtime.K`).

Owns: its shard of every block (the K-th device of --tensor_parallel_devices) and the K/V tensors of
  its heads for every open session, by cache handle.
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

import time

import msgspec
import torch

from node import logs
from node.runtime import compute, lora
from node.runtime.kv_cache import SessionCaches
from node.runtime.loading import load_or_fail, wait_for_load_order
from node.runtime.tensor_parallel.group import Group, rank_of
from procs import actor as actor_lib
from protocol.frames import DTYPES, from_frames
from protocol.messages import GroupBackward, GroupDrop, GroupRun, GroupStop, RankStats, RuntimeReady
from protocol.transport import BadMessage


class RankRuntime:
    def __init__(self, actor: actor_lib.Actor, blocks: dict, group: Group):
        self.actor = actor
        self.plan = actor.plan
        self.group = group
        self.blocks: list = [None] * self.plan.total_blocks
        for index, block in blocks.items():
            self.blocks[index] = block
        self.device = group.device
        self.caches = SessionCaches(DTYPES[self.plan.torch_dtype], self.device)
        self.counts = RankStats()

    def serve(self) -> None:
        self.actor.ready(
            RuntimeReady(
                blocks=(self.plan.start_block, self.plan.end_block),
                dtype=self.plan.torch_dtype,
                rank=self.group.rank,
                device=str(self.device),
            )
        )
        while not self.actor.stopping.is_set():
            if self.group.inbox.sock.poll(100):
                try:
                    envelope = self.group.inbox.recv()
                except BadMessage as e:  # cannot happen between our own processes; if it does, we are out of step
                    raise RuntimeError(f"unreadable message from rank 0: {e.reason}") from None
                msg = envelope.msg
                if isinstance(msg, GroupStop):
                    break
                began = time.perf_counter()
                if isinstance(msg, GroupRun):
                    self.run(msg, envelope.frames)
                elif isinstance(msg, GroupBackward):
                    self.backward(msg, envelope.frames)
                elif isinstance(msg, GroupDrop):
                    self.caches.drop(msg.handles)
                self.counts.busy_seconds += time.perf_counter() - began
            self.actor.stats = msgspec.structs.replace(
                self.counts, sessions=len(self.caches), busy_seconds=round(self.counts.busy_seconds, 3)
            )
            self.actor.publish_stats()

    def run(self, msg: GroupRun, frames) -> None:
        tensors = iter(self.to_device(from_frames(msg.tensors, frames)))
        works = []
        for w in msg.works:
            hidden = next(tensors)
            prompts = next(tensors) if w.prompts else None
            cache = None
            if w.handle >= 0:
                blocks = self.blocks[w.start : w.end]
                cache = self.caches.get(w.handle, w.batch, w.max_length, w.start, w.end, 0, blocks)
                if w.hypo_ids:
                    compute.reorder_cache(cache.kv, next(tensors))
                cache.last_used = time.monotonic()
                cache = cache.kv[w.first - w.start : w.first - w.start + w.n_blocks]
            works.append(compute.Work(w.first, w.n_blocks, hidden, cache, w.past, prompts))
        with lora.activate(msg.adapter):
            compute.run(self.blocks, works, self.plan.max_chunk_size_bytes)
        self.counts.rounds += 1

    def backward(self, msg: GroupBackward, frames) -> None:
        x, grad_outputs, prompts = self.to_device(from_frames(msg.tensors, frames))
        with lora.activate(msg.adapter):
            compute.backward(
                self.blocks[msg.first : msg.first + msg.n_blocks], x, grad_outputs, prompts if prompts.numel() else None
            )
        self.counts.backwards += 1

    def to_device(self, tensors: list) -> list:
        # frames are read-only views; the blocks and cache writes need tensors of their own
        return [t.to(self.device, copy=True) for t in tensors]


def main(actor: actor_lib.Actor) -> None:
    torch.set_grad_enabled(False)
    logs.route_transformers_logs()
    rank = rank_of(actor.name)
    actor.plan.device = actor.plan.tensor_parallel_devices[rank]
    if not wait_for_load_order(actor):
        return
    began = time.perf_counter()
    group = Group(actor.plan, rank, actor.ctx, timeout=max(60.0, actor.plan.request_timeout))
    blocks = load_or_fail(actor, group, began)
    if blocks is None:
        return
    RankRuntime(actor, blocks, group).serve()
    group.close()


if __name__ == "__main__":
    actor_lib.run(main)
