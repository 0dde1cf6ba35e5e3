"""Request tensors, checked and moved to the runtime's device and dtype.

Every problem raises RequestError with a message for the client; nothing here touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


class RequestError(ValueError):
    """The request is wrong; the message goes back to the client as is."""


@dataclass(frozen=True)
class Target:
    """Where and how the runtime computes."""

    hidden_size: int
    max_tokens: int  # --max_batch_size: tokens (B x T) in one request
    dtype: torch.dtype
    device: torch.device


def hidden_states(tensor: torch.Tensor, name: str, target: Target, batch: Optional[int] = None) -> torch.Tensor:
    if tensor.dim() != 3 or tensor.shape[-1] != target.hidden_size:
        raise RequestError(f"{name} must have shape [batch, length, {target.hidden_size}], got {list(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise RequestError(f"{name} must be a floating point tensor, got {tensor.dtype}")
    if batch is not None and tensor.shape[0] != batch:
        raise RequestError(f"{name} has batch size {tensor.shape[0]}, but the session was opened with {batch}")
    tokens = tensor.shape[0] * tensor.shape[1]
    if tokens > target.max_tokens:
        raise RequestError(f"Task size greater than max_batch_size ({tokens} > {target.max_tokens})")
    tensor = tensor.to(target.device, target.dtype)
    if not torch.isfinite(tensor).all():
        raise RequestError(f"{name} contain NaN or infinite values")
    return tensor


def prompts(tensor: torch.Tensor, n_blocks: int, batch: int, length: int, target: Target) -> Optional[torch.Tensor]:
    """Deep prompts [n_blocks, 1 or B, P, H], or None for the empty placeholder."""
    if tensor.numel() == 0:
        return None
    h = target.hidden_size
    if tensor.dim() != 4 or tensor.shape[0] != n_blocks or tensor.shape[1] not in (1, batch) or tensor.shape[3] != h:
        raise RequestError(f"prompts must have shape [{n_blocks}, 1 or {batch}, prefix, {h}], got {list(tensor.shape)}")
    if tensor.shape[2] > length:
        raise RequestError(f"prompts cover {tensor.shape[2]} positions but the input has only {length}")
    if not tensor.dtype.is_floating_point:
        raise RequestError(f"prompts must be a floating point tensor, got {tensor.dtype}")
    tensor = tensor.to(target.device, target.dtype)
    if not torch.isfinite(tensor).all():
        raise RequestError("prompts contain NaN or infinite values")
    return tensor


def hypo_ids(tensor: torch.Tensor, batch: int, target: Target) -> Optional[torch.Tensor]:
    """Beam reordering [B] int64 in [0, B), or None for the empty placeholder."""
    if tensor.numel() == 0:
        return None
    if tensor.dtype != torch.int64:
        raise RequestError(f"hypo_ids must be int64, got {tensor.dtype}")
    if tensor.shape != (batch,):
        raise RequestError(f"hypo_ids must have shape [{batch}], got {list(tensor.shape)}")
    if tensor.min() < 0 or tensor.max() >= batch:
        raise RequestError(f"hypo_ids must be in [0, {batch}), got {tensor.tolist()}")
    return tensor.to(target.device)
