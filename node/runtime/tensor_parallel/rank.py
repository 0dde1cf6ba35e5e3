"""What a rank K > 0 of the tensor-parallel group computes: its shard of every block and the K/V tensors of
its heads for every open session (by cache handle), in step with rank 0.

No sockets: procs/runtime_rank.py hands it what rank 0 pushed (GroupRun, GroupBackward, GroupDrop). It
validates nothing: rank 0 checked every request before pushing it. Its reductions (inside the blocks,
torch.distributed) pair up with rank 0's, so any failure here must end the whole group.
"""

from __future__ import annotations

import time
from typing import Sequence

import msgspec
import torch

from node.runtime import compute, lora
from node.runtime.kv_cache import SessionCaches
from protocol.frames import DTYPES, from_frames
from protocol.messages import GroupBackward, GroupDrop, GroupRun, Message, RankStats
from protocol.plan import NodePlan


class RankEngine:
    def __init__(self, plan: NodePlan, blocks: dict, device: torch.device):
        self.plan = plan
        self.blocks: list = [None] * plan.total_blocks
        for index, block in blocks.items():
            self.blocks[index] = block
        self.device = device
        self.caches = SessionCaches(DTYPES[plan.torch_dtype], device)
        self.counts = RankStats()

    def take(self, msg: Message, frames: Sequence) -> None:
        began = time.perf_counter()
        if isinstance(msg, GroupRun):
            self.run(msg, frames)
        elif isinstance(msg, GroupBackward):
            self.backward(msg, frames)
        elif isinstance(msg, GroupDrop):
            self.caches.drop(msg.handles)
        self.counts.busy_seconds += time.perf_counter() - began

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

    def stats(self) -> RankStats:
        return msgspec.structs.replace(
            self.counts, sessions=len(self.caches), busy_seconds=round(self.counts.busy_seconds, 3)
        )
