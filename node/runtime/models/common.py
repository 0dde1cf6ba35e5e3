"""Small pieces shared by the block code of several families (not by all: each family keeps its own
numerics, see the family modules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers import PretrainedConfig

from node.runtime import linear

DEFAULT_MAX_CHUNK_BYTES = 256 * 1024 * 1024
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Segment:
    """One sequence's share of a batched pass: hidden [B, T, H] at positions past..past+T-1, and its
    per-block cache (K, V) or None (forward without cache, past 0)."""

    hidden: torch.Tensor
    cache: Optional[tuple] = None
    past: int = 0


def check_cache(length: int, cache: Optional[KV], past: int) -> None:
    """Caches are [B, heads, max_length, head_dim]; a step writes slots [past, past+length)."""
    if cache is None and past != 0:
        raise ValueError("past > 0 needs a cache")
    if cache is not None and past + length > cache[0].shape[2]:
        raise ValueError(f"past {past} + {length} new tokens exceed the cache length {cache[0].shape[2]}")


def store_and_read(
    cache: Optional[KV], k: torch.Tensor, v: torch.Tensor, past: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [B, n_kv, T, d] of the new tokens -> keys and values of positions [0, past+T): the new ones
    are written to the cache slots [past, past+T) first. Slots beyond past+T may hold garbage (even NaN)
    from other steps or a rollback and are never read."""
    if cache is None:
        return k, v
    length = k.shape[2]
    k_cache, v_cache = cache
    k_cache[:, :, past : past + length] = k
    v_cache[:, :, past : past + length] = v
    return k_cache[:, :, : past + length], v_cache[:, :, : past + length]


def attend_in_chunks(
    attend: Callable[[int, int], torch.Tensor], length: int, bytes_per_score_row: int, max_chunk_bytes: int
) -> torch.Tensor:
    """Bounded score memory (PROTOCOL 4.2): `attend(start, end)` computes the queries [start, end) of a step
    against keys [0, past+end); chunks are cut so that one chunk's scores stay within max_chunk_bytes,
    where one query row over all keys costs `bytes_per_score_row`. Outputs are concatenated on dim -2."""
    chunk = max(1, max_chunk_bytes // max(1, bytes_per_score_row))
    if chunk >= length:
        return attend(0, length)
    return torch.cat([attend(s, min(s + chunk, length)) for s in range(0, length, chunk)], dim=-2)


def load_block(
    cls, config: PretrainedConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype, device, ignore=()
) -> nn.Module:
    """Builds `cls(config)` without initializing weights, loads `state` strictly (names and shapes), and
    returns it frozen in eval mode. Keys ending with one of `ignore` are dropped first."""
    state = {k: v for k, v in state.items() if not k.endswith(tuple(ignore))} if ignore else dict(state)
    with torch.device("meta"):
        block = cls(config)
    expected = block.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{cls.__name__} state mismatch: missing {missing}, unexpected {unexpected}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{cls.__name__} tensor {name} has shape {list(tensor.shape)}, expected {list(expected[name].shape)}"
            )
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    block.load_state_dict(state, strict=True, assign=True)
    block.requires_grad_(False)
    return linear.tune(block).eval()  # CPU products in the faster of two ways (node/runtime/linear.py)


class Block(nn.Module):
    """What every family's block shares; a family's module holds only what differs (docs/families.md).

    A subclass sets STATE_IGNORE (checkpoint keys that are derived from the config, not loaded) and
    DTYPE_FROM (the Linear whose weight dtype is the block's own), builds its layers in __init__(config)
    under the checkpoint's names, and defines compute (the block on inputs this base has checked and cast),
    kv_cache_shape(batch, max_length) and shard(rank, world, group) (tensor parallelism)."""

    STATE_IGNORE: tuple[str, ...] = ()
    DTYPE_FROM: str = ""

    @classmethod
    def from_state(cls, config: PretrainedConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype, device="cpu"):
        return load_block(cls, config, state, dtype=dtype, device=device, ignore=cls.STATE_IGNORE)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the block computes in: its weights', or the one quantization recorded (compute_dtype)."""
        return self.__dict__.get("compute_dtype") or self.get_submodule(self.DTYPE_FROM).weight.dtype

    def forward(
        self,
        hidden: torch.Tensor,
        cache: Optional[KV] = None,
        past: int = 0,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> torch.Tensor:
        """hidden [B, T, H] at positions past..past+T-1. With cache = (k, v) of kv_cache_shape(B, max_length),
        the new keys/values go to slots [past, past+T) and attention covers slots [0, past+T)."""
        check_cache(hidden.shape[1], cache, past)
        return self.compute(hidden.to(self.dtype), cache, past, max_chunk_bytes)

    def compute(self, hidden: torch.Tensor, cache: Optional[KV], past: int, max_chunk_bytes: int) -> torch.Tensor:
        """The family's block: `hidden` in the block's dtype, the cache checked to hold its positions."""
        raise NotImplementedError
