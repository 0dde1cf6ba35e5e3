"""The baseline node.bench measures the node against: plain transformers on this machine doing the same
work (a span's decoder layers forward and backward, greedy generation with its KV cache). Used by node.bench
and by node/tools/local_memory.py (the baseline's memory, in a process of its own)."""

from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_layers_forward(model, hidden: torch.Tensor) -> torch.Tensor:
    """The HF model's decoder layers over `hidden` (positions 0.., causal, no cache): what a node's span does."""
    inner = model.model
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
    position_embeddings = inner.rotary_emb(hidden, positions)
    for layer in inner.layers:
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def local_forward(model, hidden: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = local_layers_forward(model, hidden)
    sync(hidden.device)
    return out


def local_backward(model, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    leaf = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        out = local_layers_forward(model, leaf)
        (grad,) = torch.autograd.grad(out, leaf, grad_outputs)
    sync(inputs.device)
    return grad


def local_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with transformers' KV cache: one forward per token, logits of the last position only."""
    total = prompt.shape[1] + new_tokens
    tokens = prompt
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        while True:
            next_token = out.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, next_token], dim=1)
            if tokens.shape[1] >= total:
                break
            out = model(input_ids=next_token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    sync(prompt.device)
    return tokens
