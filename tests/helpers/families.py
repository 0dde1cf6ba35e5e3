"""Tiny random models of every family the node serves (fixed seeds), saved as checkpoints, and how to load
their blocks as the runtime does."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from node.runtime.models import get_family
from node.weights.checkpoint import Checkpoint
from tests.helpers.reference import hf_blocks, hf_layers

# (model_type, config, checkpoint layout). Small, and sharp enough (init std 0.1) that attention is far from uniform.
VARIANTS = {
    # 6 heads: ALiBi slopes beyond a power of two; the bare-model layout (h.N.*) of published BLOOMs.
    "bloom": ("bloom", dict(hidden_size=96, n_head=6, n_layer=3), "bare"),
    # Residual taken after the layer norms, and Megatron's slow-but-exact tensor-parallel sums.
    "bloom_post_ln_tp": (
        "bloom",
        dict(
            hidden_size=64,
            n_head=4,
            n_layer=2,
            apply_residual_connection_post_layernorm=True,
            pretraining_tp=2,
            slow_but_exact=True,
        ),
        "causal",
    ),
    # Falcon-40B/180B layout: 8 query heads in 2 KV groups, ln_attn/ln_mlp; rope_theta that Petals would ignore.
    "falcon_new_gqa": (
        "falcon",
        dict(
            hidden_size=128,
            num_attention_heads=8,
            num_kv_heads=2,
            num_hidden_layers=3,
            new_decoder_architecture=True,
            rope_theta=1e6,
        ),
        "causal",
    ),
    # Falcon-7B layout: multi-query, parallel attention and MLP on one layer norm.
    "falcon_mqa": (
        "falcon",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            new_decoder_architecture=False,
            multi_query=True,
            parallel_attn=True,
        ),
        "causal",
    ),
    # Sequential attention then MLP, multi-head, biases, linear rope scaling.
    "falcon_sequential": (
        "falcon",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            new_decoder_architecture=False,
            multi_query=False,
            parallel_attn=False,
            bias=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        "causal",
    ),
    # Falcon-RW layout: ALiBi instead of rotary.
    "falcon_alibi": (
        "falcon",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            alibi=True,
            new_decoder_architecture=False,
            multi_query=False,
            parallel_attn=False,
            bias=True,
        ),
        "causal",
    ),
    # Sparse MoE, GQA, and a sliding window shorter than the test sequences.
    "mixtral_window": (
        "mixtral",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=96,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
        ),
        "causal",
    ),
}


def make_model(
    path, model_type: str, config_kwargs: dict, layout: str = "causal", seed: int = 0, dtype=torch.float32
) -> str:
    """Saves a random transformers model (same arguments -> same weights) as safetensors; returns `path`."""
    config = AutoConfig.for_model(model_type, vocab_size=64, initializer_range=0.1, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # transformers initializes norms to 1 and biases to 0, which would hide a forgotten scale or bias.
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
            elif param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model = model.to(dtype)
    (model.base_model if layout == "bare" else model).save_pretrained(str(path), safe_serialization=True)
    return str(path)


class Model:
    """A checkpoint loaded both ways: our blocks (through Checkpoint, as the runtime loads them) and transformers."""

    def __init__(self, path: str, dtype=torch.float32):
        checkpoint = Checkpoint.open(path)
        self.config = checkpoint.config()
        self.family = get_family(self.config)
        self.n = self.config.num_hidden_layers
        self.blocks = [
            self.family.block_class.from_state(
                self.config,
                checkpoint.block_state(f"{self.family.block_prefix}.{i}.", dtype=dtype),
                dtype=dtype,
                device="cpu",
            )
            for i in range(self.n)
        ]
        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.dtype = dtype

    def ours(self, hidden, start=0, end=None, **kwargs):
        for block in self.blocks[start : end or self.n]:
            hidden = block(hidden, **kwargs)
        return hidden

    def ref(self, hidden, start=0, end=None, prompts=None):
        return hf_blocks(self.hf, hidden, start, end or self.n, prompts)

    def ref_steps(self, hidden, lengths):
        """transformers' own incremental inference (its KV cache, use_cache=True) over steps of `lengths` tokens."""
        from transformers import DynamicCache

        layers, cache, outputs, past = hf_layers(self.hf), DynamicCache(config=self.hf.config), [], 0
        for length in lengths:
            chunk = hidden[:, past : past + length]
            hooks = [
                layers[0].register_forward_pre_hook(
                    lambda m, args, kwargs: ((chunk,) + tuple(args[1:]), kwargs), with_kwargs=True
                ),
                layers[-1].register_forward_hook(
                    lambda m, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)
                ),
            ]
            try:
                self.hf(inputs_embeds=torch.zeros_like(chunk), past_key_values=cache, use_cache=True)
            finally:
                for hook in hooks:
                    hook.remove()
            past += length
        return torch.cat(outputs, dim=1)

    def new_cache(self, batch, max_length):
        # NaN, not zeros: slots beyond the valid prefix must never reach the output.
        return [
            tuple(torch.full(b.kv_cache_shape(batch, max_length), float("nan"), dtype=self.dtype) for _ in range(2))
            for b in self.blocks
        ]

    def step(self, hidden, cache, past, **kwargs):
        for block, kv in zip(self.blocks, cache):
            hidden = block(hidden, cache=kv, past=past, **kwargs)
        return hidden


def hidden_states(batch, length, size, seed=0, dtype=torch.float32):
    return torch.randn(batch, length, size, generator=torch.Generator().manual_seed(seed)).to(dtype)
