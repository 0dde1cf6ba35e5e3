"""The runtime's own checks of a request: those that need tensor values or the attention cache.

Everything that can be told from shapes, dtypes, lengths and numbers was checked by the frontend
(protocol/request_checks.py) before the request was sent here; what remains is checked as the tensors move
to the runtime's device and dtype: finite values, the range of hypo_ids, a position against what the
session's cache holds. Every problem raises RequestError with a message for the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# a decode step's hidden states are checked with one numpy call: torch's isfinite and all are two
# dispatches, a third of the runtime's bookkeeping for a one-token step; large tensors stay with torch,
# whose reductions use every thread
_NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)
_NUMPY_LIMIT = 1 << 16  # elements


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
    if not _all_finite(tensor):
        raise RequestError(f"{name} contain NaN or infinite values")
    return tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_FLOATS and tensor.numel() <= _NUMPY_LIMIT:
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


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


def states(tensor: torch.Tensor, name: str, hidden_size: int, batch: Optional[int] = None) -> None:
    """Hidden states (or their gradients) are [batch, length, hidden_size]: the frontend checked this, and
    what reaches the blocks otherwise fails a whole round (every session in it), or the runtime itself."""
    shape = tuple(tensor.shape)
    if len(shape) != 3 or shape[2] != hidden_size or (batch is not None and shape[0] != batch):
        expected = f"[{batch if batch is not None else 'batch'}, length, {hidden_size}]"
        raise RequestError(f"{name} must have shape {expected}, got {list(shape)}")


def room(position: int, length: int, max_length: int) -> None:
    """A step of `length` tokens from `position` must fit the session's max_length."""
    if position + length > max_length:
        raise RequestError(
            f"a step of {length} tokens from position {position} exceeds the session's max_length {max_length}"
        )


def position(position: int, held: int) -> None:
    """A step continues from `position`: the cache must hold at least that many tokens."""
    if position > held:
        raise RequestError(f"start_from_position {position} is past the {held} tokens this session holds")
