"""Model families the node can serve, keyed by `config.model_type`.

This module is the registry and holds what the supervisor needs to plan a node (block prefix, dht
prefix rule, attention geometry, cache budget rule) without importing torch; the block code of each
family lives in its own module (`node/runtime/models/<family>.py`) and is imported only by the runtime.

Adding a family: write `node/runtime/models/<family>.py` with its block class, then add its FamilySpec below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

Config = Any  # a transformers PretrainedConfig (not imported here: the supervisor reads configs without torch)


@dataclass(frozen=True)
class Geometry:
    """Attention shape of a block: what the cache budget and the runtime's K/V tensors are made of."""

    num_heads: int
    num_kv_heads: int  # heads of the K/V cache (GQA/MQA: fewer than num_heads)
    head_dim: int


def standard_geometry(config: Config) -> Geometry:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Geometry(heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads)


def kv_groups(config: Config) -> int:
    """heads / KV heads: how Petals divides the cache budget of GQA models (PROTOCOL 5.7)."""
    geometry = standard_geometry(config)
    return geometry.num_heads // geometry.num_kv_heads


@dataclass(frozen=True)
class FamilySpec:
    name: str
    block_prefix: str  # state-dict prefix of the decoder layers; block i is "{block_prefix}.{i}."
    block: str  # "module:Class" of the block: from_state(config, state, dtype=, device=), kv_cache_shape(...)
    default_dht_prefix: Callable[[str], str]  # Hub repo name -> DHT prefix (PROTOCOL 2.1)
    kv_groups_for_budget: Callable[[Config], int]  # divides the cache budget (PROTOCOL 5.6, 5.7)
    geometry: Callable[[Config], Geometry] = standard_geometry
    # Client side: a module of the base model applied to the token embeddings before block 0 (BLOOM's
    # "word_embeddings_layernorm"), None when the embeddings go to the blocks as they are.
    embed_norm: Optional[str] = None

    @property
    def block_class(self) -> type:
        module, _, name = self.block.partition(":")
        return getattr(importlib.import_module(module), name)


# --- the families -------------------------------------------------------------------------------


def _llama_prefix(repo: str) -> str:
    prefix = repo.rsplit("/", 1)[-1].replace(".", "-")
    return prefix if prefix.endswith("-hf") else prefix + "-hf"


def _bloom_prefix(repo: str) -> str:
    # Petals loads "bigscience/<x>-petals" as "bigscience/<x>" and then appends "-petals" again.
    if repo.startswith("bigscience/") and repo.endswith("-petals"):
        repo = repo[: -len("-petals")]
    return (repo + "-petals").replace(".", "-")


def falcon_kv_heads(config: Config) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def _falcon_geometry(config: Config) -> Geometry:
    return Geometry(
        config.num_attention_heads, falcon_kv_heads(config), config.hidden_size // config.num_attention_heads
    )


_FAMILIES = {
    "llama": FamilySpec(
        name="llama",
        block_prefix="model.layers",
        block="node.runtime.models.llama:LlamaBlock",
        default_dht_prefix=_llama_prefix,
        kv_groups_for_budget=kv_groups,
    ),
    "bloom": FamilySpec(
        name="bloom",
        block_prefix="h",
        block="node.runtime.models.bloom:BloomBlock",
        default_dht_prefix=_bloom_prefix,
        kv_groups_for_budget=lambda config: 1,
        embed_norm="word_embeddings_layernorm",
    ),
    "falcon": FamilySpec(
        name="falcon",
        block_prefix="transformer.h",
        block="node.runtime.models.falcon:FalconBlock",
        default_dht_prefix=lambda repo: repo.rsplit("/", 1)[-1].replace(".", "-"),
        kv_groups_for_budget=lambda config: config.num_attention_heads // falcon_kv_heads(config),
        geometry=_falcon_geometry,
    ),
    "mixtral": FamilySpec(
        name="mixtral",
        block_prefix="model.layers",
        block="node.runtime.models.mixtral:MixtralBlock",
        default_dht_prefix=lambda repo: repo.replace(".", "-"),
        # Petals' Mixtral config hard-codes num_key_value_groups = 1: the budget is counted as without
        # GQA (PROTOCOL 7.3 item 12), while the cache itself keeps num_key_value_heads.
        kv_groups_for_budget=lambda config: 1,
    ),
}


def get_family(config: Config) -> FamilySpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[model_type]
