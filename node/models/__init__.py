"""Model families the node can serve, keyed by `config.model_type`.

Adding a family: write `node/models/<family>.py` with a block class and a `FAMILY = FamilySpec(...)`,
then add one line to `_FAMILIES` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import PretrainedConfig


@dataclass
class Segment:
    """One sequence's share of a batched pass: hidden [B, T, H] at positions past..past+T-1, and its
    per-block cache (K, V) or None (forward without cache, past 0)."""

    hidden: torch.Tensor
    cache: Optional[tuple] = None
    past: int = 0


@dataclass(frozen=True)
class Geometry:
    """Attention shape of a block: what the cache budget and the runtime's K/V tensors are made of."""

    num_heads: int
    num_kv_heads: int  # heads of the K/V cache (GQA/MQA: fewer than num_heads)
    head_dim: int


def standard_geometry(config: PretrainedConfig) -> Geometry:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Geometry(heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    block_prefix: str  # state-dict prefix of the decoder layers; block i is "{block_prefix}.{i}."
    block_class: type  # has from_state(config, state, dtype=, device=) and kv_cache_shape(batch, max_length)
    default_dht_prefix: Callable[[str], str]  # Hub repo name -> DHT prefix (PROTOCOL 2.1)
    kv_groups_for_budget: Callable[[PretrainedConfig], int]  # divides the cache budget (PROTOCOL 5.7)
    geometry: Callable[[PretrainedConfig], Geometry] = standard_geometry
    # Client side: a module of the base model applied to the token embeddings before block 0 (BLOOM's
    # "word_embeddings_layernorm"), None when the embeddings go to the blocks as they are.
    embed_norm: Optional[str] = None


# model_type -> module defining FAMILY; imported lazily so one family's import cost is not paid by others.
_FAMILIES = {
    "bloom": "node.models.bloom",
    "falcon": "node.models.falcon",
    "llama": "node.models.llama",
    "mixtral": "node.models.mixtral",
}


def get_family(config: PretrainedConfig) -> FamilySpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_FAMILIES))}")
    return importlib.import_module(_FAMILIES[model_type]).FAMILY
