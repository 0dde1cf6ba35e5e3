"""One BLOOM block in plain torch (PROTOCOL 4.1), numerically matching transformers' BloomBlock: ALiBi
added with `baddbmm` in the block's dtype, a boolean causal mask, softmax in float32, the tanh GELU
written out as BLOOM writes it. transformers has only the "eager" attention for BLOOM; this follows it.

The cache keeps all heads: K and V are [B, heads, max_length, head_dim] (PROTOCOL 4.2 allows any layout).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from node.runtime.models.common import (
    KV,
    Block,
    attend_in_chunks,
    store_and_read,
)


@functools.lru_cache(maxsize=64)
def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The ALiBi slope of each head, in float32, computed with transformers' operations so the values are
    bit-identical (a power of two of heads gets a geometric series; others interleave a second one).
    Made once per device and kept (read only): building them copies from the host, which on a GPU waits
    for the device, once per block per step."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in inference and training
        return _alibi_slopes(num_heads, device)


def _alibi_slopes(num_heads: int, device) -> torch.Tensor:
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), device=device, dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, device=device, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), device=device, dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, device=device, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    # BLOOM's tanh approximation with its own constants, in its own op order (the eval-mode path of HF).
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class _Attention(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.query_key_value = nn.Linear(hidden, 3 * hidden, bias=True)
        self.dense = nn.Linear(hidden, hidden, bias=True)


class _MLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, 4 * hidden)
        self.dense_4h_to_h = nn.Linear(4 * hidden, hidden)


class BloomBlock(Block):
    """Parameter names equal those under "h.{i}." in BLOOM checkpoints."""

    DTYPE_FROM = "self_attention.query_key_value"

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.n_head
        self.num_kv_heads = self.num_heads
        # the model's heads and this rank's first one (when sharded): ALiBi slopes depend on both
        self.all_heads, self.head_offset = self.num_heads, 0
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_head {self.num_heads}")
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        self.post_ln_residual = config.apply_residual_connection_post_layernorm
        # Megatron's tensor-parallel summation order, used by HF only when both are set.
        self.slow_tp = config.pretraining_tp if (config.pretraining_tp > 1 and config.slow_but_exact) else 1
        self.input_layernorm = nn.LayerNorm(self.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = _Attention(self.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(self.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = _MLP(self.hidden_size)

    def kv_cache_shape(self, batch: int, max_length: int) -> tuple[int, int, int, int]:
        return (batch, self.num_heads, max_length, self.head_dim)

    def shard(self, rank: int, world: int, group) -> "BloomBlock":
        """Keep this rank's heads (the fused projection holds q, k, v per head) and MLP columns."""
        from node.runtime.tensor_parallel import shard
        from node.runtime.tensor_parallel.split import head_split

        heads = head_split(self.num_heads, self.num_heads, world)[rank]
        attn, d = self.self_attention, self.head_dim
        attn.query_key_value = shard.column(attn.query_key_value, shard.head_rows(heads.q0, heads.q1, 3 * d), group)
        attn.dense = shard.row(attn.dense, shard.head_rows(heads.q0, heads.q1, d), group)
        shard.mlp(self.mlp, ("dense_h_to_4h",), "dense_4h_to_h", rank, world, "the MLP width", group)
        self.head_offset = heads.q0
        self.num_heads = self.num_kv_heads = heads.q1 - heads.q0
        if self.slow_tp > 1:  # the exact Megatron summation order cannot survive the split; its missing bias can
            attn.dense.bias = self.mlp.dense_4h_to_h.bias = None
            self.slow_tp = 1
        return self

    def _slopes(self, device) -> torch.Tensor:
        return alibi_slopes(self.all_heads, device)[self.head_offset : self.head_offset + self.num_heads]

    def _linear(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        if self.slow_tp == 1:
            return layer(x)
        # As HF's slow_but_exact path: slices of the input dimension summed in order, and no bias.
        out = torch.zeros(*x.shape[:-1], layer.out_features, dtype=x.dtype, device=x.device)
        step = layer.in_features / self.slow_tp
        for i in range(self.slow_tp):
            cols = slice(int(i * step), int((i + 1) * step))
            out = out + F.linear(x[..., cols], layer.weight[:, cols])
        return out

    def compute(self, hidden: torch.Tensor, cache: Optional[KV], past: int, max_chunk_bytes: int) -> torch.Tensor:
        batch, length, _ = hidden.shape
        x = self.input_layernorm(hidden)
        residual = x if self.post_ln_residual else hidden

        fused = self.self_attention.query_key_value(x).view(batch, length, self.num_heads, 3, self.head_dim)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))  # [B, heads, T, d]
        k, v = store_and_read(cache, k, v, past)
        keys = past + length
        q = q.reshape(batch * self.num_heads, length, self.head_dim)
        k = k.reshape(batch * self.num_heads, keys, self.head_dim).transpose(-1, -2)  # [B*heads, d, S]
        v = v.reshape(batch * self.num_heads, keys, self.head_dim)
        # ALiBi over absolute key positions (softmax is shift-invariant per query, as in HF).
        positions = torch.arange(keys, device=hidden.device, dtype=torch.float32)
        alibi = self._slopes(hidden.device)[:, None] * positions
        alibi = alibi.to(hidden.dtype).expand(batch, self.num_heads, keys).reshape(batch * self.num_heads, 1, keys)

        def attend(start: int, end: int) -> torch.Tensor:
            seen = past + end
            scores = alibi[..., :seen].baddbmm(q[:, start:end], k[..., :seen], beta=1.0, alpha=self.inv_norm_factor)
            scores = scores.view(batch, self.num_heads, end - start, seen)
            if end - start > 1:  # a single query row sees every key up to itself
                allowed = positions[:seen] <= positions[past + start : past + end, None]
                scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.bmm(probs.view(batch * self.num_heads, end - start, seen), v[:, :seen])

        row_bytes = batch * self.num_heads * keys * q.element_size()
        context = attend_in_chunks(attend, length, row_bytes, max_chunk_bytes)  # [B*heads, T, d]
        context = context.view(batch, self.num_heads, length, self.head_dim).permute(0, 2, 1, 3)
        context = context.reshape(batch, length, self.num_heads * self.head_dim)
        attn_out = residual + self._linear(context, self.self_attention.dense)

        x = self.post_attention_layernorm(attn_out)
        residual = x if self.post_ln_residual else attn_out
        return residual + self._linear(bloom_gelu(self.mlp.dense_h_to_4h(x)), self.mlp.dense_4h_to_h)
