"""The runtime's own checks of a request: those that need tensor values or the attention cache.

Everything that can be told from shapes, dtypes, lengths and numbers was checked by the frontend
(protocol/request_checks.py) before the request was sent here; what remains is checked as the tensors move
to the runtime's device and dtype: finite values, the range of hypo_ids, a position against what the
session's cache holds. Every problem raises RequestError with a message for the client.
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

    dtype: torch.dtype
    device: torch.device


def finite(tensor: torch.Tensor, name: str, target: Target) -> torch.Tensor:
    """The tensor on the runtime's device and dtype, refused if it holds NaN or infinities."""
    tensor = tensor.to(target.device, target.dtype)
    if not torch.isfinite(tensor).all():
        raise RequestError(f"{name} contain NaN or infinite values")
    return tensor


def prompts(tensor: torch.Tensor, target: Target) -> Optional[torch.Tensor]:
    """Deep prompts, or None for the empty placeholder."""
    return None if tensor.numel() == 0 else finite(tensor, "prompts", target)


def hypo_ids(tensor: torch.Tensor, batch: int, target: Target) -> Optional[torch.Tensor]:
    """Beam reordering in [0, batch), or None for the empty placeholder."""
    if tensor.numel() == 0:
        return None
    if tensor.min() < 0 or tensor.max() >= batch:
        raise RequestError(f"hypo_ids must be in [0, {batch}), got {tensor.tolist()}")
    return tensor.to(target.device)


def position(position: int, held: int) -> None:
    """A step continues from `position`: the cache must hold at least that many tokens."""
    if position > held:
        raise RequestError(f"start_from_position {position} is past the {held} tokens this session holds")
