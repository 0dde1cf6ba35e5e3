"""What a chain of blocks computes for each kind of request (PROTOCOL 3.4-3.6, 4.3, 4.4).

Pure functions over torch tensors: no sockets, no queues. The runtime validates inputs, picks the
blocks and the caches, and calls these. `run` is the batched pass: several pieces of work (inference
steps of different sessions, or forward requests), each over its own range of blocks, go through
each block together, so that their tokens share one matrix multiplication per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from node.runtime.models.common import Segment

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Work:
    """One request's share of a batched pass over blocks[first : first + n_blocks]."""

    first: int  # index into the runtime's blocks
    n_blocks: int
    hidden: torch.Tensor  # [B, T, H]
    cache: Optional[Sequence[KV]] = None  # one (K, V) per block, or None without a cache (forward)
    past: int = 0  # cached positions before these tokens
    prompts: Optional[torch.Tensor] = None  # [n_blocks, B|1, P, H], added to the first P positions
    step: Any = (
        None  # the runtime's inference step this work advances (node/runtime/engine.py Step); None for a forward
    )


def add_prompt(hidden: torch.Tensor, prompt: Optional[torch.Tensor]) -> torch.Tensor:
    """Deep prompt tuning: a per-block bias on the first P positions of the block's input."""
    if prompt is None:
        return hidden
    p = prompt.shape[-2]
    return torch.cat([hidden[:, :p] + prompt, hidden[:, p:]], dim=1)


def _prompt(prompts: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    return None if prompts is None else prompts[i]


def run(blocks: Sequence[nn.Module], works: Sequence[Work], max_chunk_bytes: int) -> list[torch.Tensor]:
    """Each work's hidden states after its blocks, block by block for all works at once."""
    hidden = [w.hidden for w in works]
    first = min(w.first for w in works)
    last = max(w.first + w.n_blocks for w in works)
    with torch.inference_mode():
        for i in range(first, last):
            active = [j for j, w in enumerate(works) if w.first <= i < w.first + w.n_blocks]
            segments = []
            for j in active:
                w, k = works[j], i - works[j].first
                h = add_prompt(hidden[j], _prompt(w.prompts, k))
                segments.append(Segment(h, None if w.cache is None else w.cache[k], w.past))
            block = blocks[i]
            if hasattr(block, "forward_segments"):
                outputs = block.forward_segments(segments, max_chunk_bytes=max_chunk_bytes)
            else:  # a family without batched code: one sequence at a time, same results
                outputs = [block(s.hidden, s.cache, s.past, max_chunk_bytes=max_chunk_bytes) for s in segments]
            for j, out in zip(active, outputs):
                hidden[j] = out
    return hidden


def backward(
    blocks: Sequence[nn.Module],
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    prompts: Optional[torch.Tensor],
    keep_bytes: int = 0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients w.r.t. the chain's input and each block's prompt; the weights stay frozen.

    One forward pass with autograd, then the backward pass, block by block from the last. What autograd
    saves of the last blocks is kept from that forward, as long as it fits in `keep_bytes` (the memory
    kept free for backward passes); the earlier blocks keep only their input and are run again when the
    backward reaches them (checkpointing, which is all that Petals' server does: a second forward of every
    block, a third more compute). The first block's saved bytes, counted as it runs, tell how many fit."""
    n = len(blocks)
    block_inputs: list[torch.Tensor] = []
    kept: dict[int, torch.Tensor] = {}  # block -> its output, with the graph back to its input
    keep_from = n  # blocks from here on keep their graphs
    hidden = inputs
    for i, block in enumerate(blocks):
        leaf = add_prompt(hidden, _prompt(prompts, i)).detach().requires_grad_(True)
        block_inputs.append(leaf)
        if i == 0:
            saved = SavedBytes(block)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                out = block(leaf)
            # the last block's graph is kept in any case: a second forward would hold as much at once
            keep_from = n - min(n, max(1, keep_bytes // max(1, saved.total)))
            if keep_from == 0:
                kept[0] = out
            hidden = out.detach()
        elif i >= keep_from:
            with torch.enable_grad():
                kept[i] = block(leaf)
            hidden = kept[i].detach()
        elif i + 1 < n:
            with torch.no_grad():
                hidden = block(leaf)
    grad = grad_outputs
    grad_prompts = []
    for i in reversed(range(n)):
        leaf = block_inputs[i]
        out = kept.pop(i, None)
        if out is None:
            with torch.enable_grad():
                out = blocks[i](leaf)
        (grad,) = torch.autograd.grad(out, leaf, grad, allow_unused=True)
        del out
        if grad is None:
            grad = torch.zeros_like(leaf)
        if prompts is not None:
            grad_prompts.append(grad[:, : prompts.shape[-2]])
    grad_prompts_out = torch.stack(grad_prompts[::-1]) if prompts is not None else None
    return grad, grad_prompts_out


class SavedBytes:
    """Counts the bytes autograd saves for backward in a block's forward, less the block's own weights
    (which it saves by reference, not as copies)."""

    def __init__(self, block: nn.Module):
        self.weights = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers())}
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # e.g. a tensor subclass without one storage
            return tensor
        ptr = storage.data_ptr()
        if ptr not in self.weights and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def reorder_cache(cache: Sequence[KV], hypo_ids: torch.Tensor) -> None:
    """Beam search: every K and V row of every block follows its hypothesis, over the full length."""
    with torch.inference_mode():
        for k, v in cache:
            k.copy_(k.index_select(0, hypo_ids))
            v.copy_(v.index_select(0, hypo_ids))
