"""Small random Llama checkpoints for tests and local swarms (no Hub access needed).

python -m node.tools.tinymodel PATH [--preset tiny|small] [--hidden_size 256 --num_layers 8 ...]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    # where a step's compute is well under a millisecond: what the node adds to a step shows
    "micro": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=1024),
    "tiny": dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4, vocab_size=1024),
    "small": dict(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=8, vocab_size=32000),
    # 4 blocks of Llama-3.1-8B's shape (random weights): where the blocks' own compute dominates a step
    "8b": dict(hidden_size=4096, num_layers=4, num_heads=32, num_kv_heads=8, intermediate_size=14336, vocab_size=32000),
}


def make_tiny_llama(
    path: str,
    *,
    hidden_size: int = 256,
    num_layers: int = 8,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    intermediate_size: Optional[int] = None,
    vocab_size: int = 1024,
    seed: int = 0,
    shards: int = 1,
    rope_scaling: Optional[dict] = None,
    dtype: torch.dtype = torch.float32,
    initializer_range: float = 0.02,
    max_position_embeddings: int = 2048,
    **config_kwargs,
) -> str:
    """Saves a random LlamaForCausalLM (same seed and arguments -> same weights) as safetensors; returns `path`.
    `shards` > 1 gives a sharded checkpoint with an index, in at least that many files."""
    if intermediate_size is None:
        intermediate_size = -(-(hidden_size * 8 // 3) // 64) * 64  # the usual ~8/3 ratio, rounded up to 64
    config = LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        rope_scaling=rope_scaling,
        initializer_range=initializer_range,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # HF initializes norm weights to 1 and biases to 0, which would hide a forgotten scale or bias.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".bias"):
                param.normal_(0, initializer_range)
    model = model.to(dtype)
    os.makedirs(path, exist_ok=True)
    max_shard_size = "50GB"
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        max_shard_size = max(1, total // shards)  # bytes; the largest tensor may still get a file of its own
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    return path


def make_preset(path: str, name: str, **overrides) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return make_tiny_llama(path, **{**PRESETS[name], **overrides})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--hidden_size", type=int)
    p.add_argument("--num_layers", type=int)
    p.add_argument("--num_heads", type=int)
    p.add_argument("--num_kv_heads", type=int)
    p.add_argument("--intermediate_size", type=int)
    p.add_argument("--vocab_size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--shards", type=int)
    p.add_argument("--rope_scaling", type=json.loads, help='JSON, e.g. \'{"rope_type": "linear", "factor": 2.0}\'')
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    args = vars(p.parse_args(argv))
    path, preset = args.pop("path"), args.pop("preset")
    overrides = {k: v for k, v in args.items() if v is not None}
    if "dtype" in overrides:
        overrides["dtype"] = getattr(torch, overrides["dtype"])
    make_preset(path, preset, **overrides)
    print(path)


if __name__ == "__main__":
    main()
