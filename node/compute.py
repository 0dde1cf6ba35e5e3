"""What a chain of blocks computes for each kind of request (PROTOCOL 3.4-3.6, 4.3, 4.4).

Pure functions over torch tensors: no sockets, no queues. The runtime validates inputs, picks the
blocks and the cache, and calls these.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]


def add_prompt(hidden: torch.Tensor, prompt: Optional[torch.Tensor]) -> torch.Tensor:
    """Deep prompt tuning: a per-block bias on the first P positions of the block's input."""
    if prompt is None:
        return hidden
    p = prompt.shape[-2]
    return torch.cat([hidden[:, :p] + prompt, hidden[:, p:]], dim=1)


def _prompt(prompts: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    return None if prompts is None else prompts[i]


def forward(blocks: Sequence[nn.Module], hidden: torch.Tensor, prompts: Optional[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        for i, block in enumerate(blocks):
            hidden = block(add_prompt(hidden, _prompt(prompts, i)))
    return hidden


def backward(
    blocks: Sequence[nn.Module],
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    prompts: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients w.r.t. the chain's input and each block's prompt; the weights stay frozen."""
    block_inputs = []
    hidden = inputs
    with torch.no_grad():
        for i, block in enumerate(blocks):
            hidden = add_prompt(hidden, _prompt(prompts, i))
            block_inputs.append(hidden)
            if i + 1 < len(blocks):
                hidden = block(hidden)
    grad = grad_outputs
    grad_prompts = []
    for i in reversed(range(len(blocks))):
        leaf = block_inputs[i].detach().requires_grad_(True)
        with torch.enable_grad():
            out = blocks[i](leaf)
        (grad,) = torch.autograd.grad(out, leaf, grad, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(leaf)
        if prompts is not None:
            grad_prompts.append(grad[:, : prompts.shape[-2]])
    grad_prompts_out = torch.stack(grad_prompts[::-1]) if prompts is not None else None
    return grad, grad_prompts_out


def reorder_cache(cache: Sequence[KV], hypo_ids: torch.Tensor) -> None:
    """Beam search: every K and V row of every block follows its hypothesis, over the full length."""
    for k, v in cache:
        k.copy_(k.index_select(0, hypo_ids))
        v.copy_(v.index_select(0, hypo_ids))


def inference_step(
    blocks: Sequence[nn.Module],
    cache: Sequence[KV],
    hidden: torch.Tensor,
    prompts: Optional[torch.Tensor],
    hypo_ids: Optional[torch.Tensor],
    position: int,
    max_chunk_bytes: int,
) -> torch.Tensor:
    """Attend to the `position` cached tokens plus the new ones, writing the new K/V after them."""
    with torch.inference_mode():
        if hypo_ids is not None:
            reorder_cache(cache, hypo_ids)
        if hidden.shape[1] == 0:
            return hidden
        for i, block in enumerate(blocks):
            hidden = block(
                add_prompt(hidden, _prompt(prompts, i)), cache=cache[i], past=position, max_chunk_bytes=max_chunk_bytes
            )
    return hidden
