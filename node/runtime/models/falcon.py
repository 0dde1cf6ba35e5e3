"""One Falcon block in plain torch (PROTOCOL 4.1), numerically matching transformers' FalconDecoderLayer
with its default "sdpa" attention, in every variant transformers supports:

- the new decoder architecture (Falcon-40B/180B): grouped KV heads laid out per group in the fused
  projection, attention and MLP in parallel, with two layer norms (ln_attn, ln_mlp) or one;
- the older layouts (Falcon-7B/RW): multi-query (one KV head) or multi-head, `parallel_attn` or the
  sequential attention-then-MLP block with post_attention_layernorm;
- rotary positions (rope_theta and rope_scaling as in the config), or ALiBi when `config.alibi`.

The cache keeps the KV heads the fused projection makes (new architecture: num_kv_heads; multi-query:
1; otherwise all heads): K and V are [B, kv_heads, max_length, head_dim].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import get_activation

from node.runtime.models import falcon_kv_heads
from node.runtime.models.bloom import alibi_slopes
from node.runtime.models.common import (
    KV,
    Block,
    attend_in_chunks,
    store_and_read,
)
from node.runtime.models.llama import Rotary, rotate_half


def fused_heads(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V copied to one head per query head, on CUDA only. No fused CUDA kernel takes a mask together
    with enable_gqa, nor a single broadcast key head (multi-query): SDPA falls back to its unfused math
    kernel for both, on every call. The copy lets the memory-efficient kernel run; on the CPU the node keeps
    the calls that match transformers' values."""
    groups = heads // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


class FalconLinear(nn.Linear):
    # transformers' FalconLinear: a matmul, then the bias (not fused as in F.linear).
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class _Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, heads: int, kv: int, head_dim: int):
        super().__init__()
        h = config.hidden_size
        self.query_key_value = FalconLinear(h, (heads + 2 * kv) * head_dim, bias=config.bias)
        self.dense = FalconLinear(h, h, bias=config.bias)


class _MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense_h_to_4h = FalconLinear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.act = get_activation(config.activation)
        self.dense_4h_to_h = FalconLinear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconBlock(Block):
    """Parameter names equal those under "transformer.h.{i}." in Falcon checkpoints."""

    STATE_IGNORE = ("rotary_emb.inv_freq",)
    DTYPE_FROM = "self_attention.query_key_value"

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}")
        self.new_arch = bool(config.new_decoder_architecture)
        self.multi_query = bool(config.multi_query) and not self.new_arch
        self.parallel = bool(config.parallel_attn)
        self.num_kv_heads = falcon_kv_heads(config)
        if not self.new_arch and not self.multi_query and config.num_kv_heads != self.num_heads:
            raise ValueError(
                "Falcon without multi_query or the new architecture needs num_kv_heads == num_attention_heads, "
                f"got {config.num_kv_heads}"
            )
        self.groups = self.num_heads // self.num_kv_heads
        # the model's heads and this rank's first one (when sharded): ALiBi slopes depend on both
        self.all_heads, self.head_offset = self.num_heads, 0
        norms = config.num_ln_in_parallel_attn or (2 if self.new_arch else 1)
        # The combinations transformers can run (others fail there on a missing layer norm).
        if self.new_arch and not self.parallel:
            raise ValueError("Falcon's new decoder architecture needs parallel_attn")
        if not self.new_arch and self.parallel and norms != 1:
            raise ValueError("Falcon with parallel_attn and the old architecture has one layer norm")
        self.two_norms = self.parallel and norms == 2
        eps = config.layer_norm_epsilon
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(self.hidden_size, eps=eps)
            self.ln_mlp = nn.LayerNorm(self.hidden_size, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(self.hidden_size, eps=eps)
            if not self.parallel:
                self.post_attention_layernorm = nn.LayerNorm(self.hidden_size, eps=eps)
        self.self_attention = _Attention(config, self.num_heads, self.num_kv_heads, self.head_dim)
        self.mlp = _MLP(config)
        self.alibi = bool(config.alibi)
        # transformers derives rotary frequencies from rope_theta and rope_scaling (Petals fixes base 10000).
        self.rotary = None if self.alibi else Rotary.for_config(config)

    def kv_cache_shape(self, batch: int, max_length: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, max_length, self.head_dim)

    def shard(self, rank: int, world: int, group) -> "FalconBlock":
        """Keep this rank's heads in the fused projection's layout (whole KV groups; multi-query keeps
        its one K and V on every rank) and its MLP columns."""
        from node.runtime.tensor_parallel import shard
        from node.runtime.tensor_parallel.split import head_split

        heads = head_split(self.num_heads, self.num_kv_heads, world)[rank]
        attn, d = self.self_attention, self.head_dim
        if self.new_arch:  # [kv groups, groups + 2, d]
            rows = shard.head_rows(heads.kv0, heads.kv1, (self.groups + 2) * d)
        elif self.multi_query:  # [heads + 2, d]: this rank's queries, then the shared key and value
            rows = torch.cat(
                [torch.arange(heads.q0 * d, heads.q1 * d), torch.arange(self.num_heads * d, (self.num_heads + 2) * d)]
            )
        else:  # [heads, 3, d]
            rows = shard.head_rows(heads.q0, heads.q1, 3 * d)
        attn.query_key_value = shard.column(attn.query_key_value, rows, group)
        attn.dense = shard.row(attn.dense, shard.head_rows(heads.q0, heads.q1, d), group)
        shard.mlp(self.mlp, ("dense_h_to_4h",), "dense_4h_to_h", rank, world, "ffn_hidden_size", group)
        self.head_offset = heads.q0
        self.num_heads, self.num_kv_heads = heads.q1 - heads.q0, heads.kv1 - heads.kv0
        self.groups = self.num_heads // self.num_kv_heads
        return self

    def compute(self, hidden: torch.Tensor, cache: Optional[KV], past: int, max_chunk_bytes: int) -> torch.Tensor:
        residual = hidden
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(hidden), self.ln_mlp(hidden)
        else:
            attn_in = mlp_in = self.input_layernorm(hidden)
        attn = self._attention(attn_in, cache, past, max_chunk_bytes)
        if not self.parallel:
            residual = residual + attn
            mlp_in = self.post_attention_layernorm(residual)
        out = self.mlp(mlp_in)
        if self.parallel:
            out = out + attn
        return residual + out

    def _split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection [B, T, (heads + 2 kv) d] -> q [B, T, heads, d], k and v [B, T, kv, d]."""
        batch, length, _ = fused.shape
        d = self.head_dim
        if self.new_arch:  # per KV group: its query heads, then its key, then its value
            qkv = fused.view(batch, length, self.num_kv_heads, self.groups + 2, d)
            return qkv[:, :, :, :-2].reshape(batch, length, self.num_heads, d), qkv[:, :, :, -2], qkv[:, :, :, -1]
        if self.multi_query:  # all query heads, then the one key and the one value
            qkv = fused.view(batch, length, self.num_heads + 2, d)
            return qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
        qkv = fused.view(batch, length, self.num_heads, 3, d)  # per head: query, key, value
        return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]

    def _attention(self, x: torch.Tensor, cache: Optional[KV], past: int, max_chunk_bytes: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self._split(self.self_attention.query_key_value(x))
        if self.new_arch and self.groups > 1 and cache is None and torch.is_grad_enabled():
            # Backward: copy as transformers does, so that a group's gradients are summed in its order.
            k, v = (t[:, :, :, None].expand(*t.shape[:3], self.groups, self.head_dim).flatten(2, 3) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, n, T, d]
        if self.rotary is not None:
            cos, sin = self.rotary.get(past, length, x.device, x.dtype)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k, v = store_and_read(cache, k, v, past)
        keys = past + length
        # The new architecture's KV heads serve groups of query heads: SDPA's GQA reads them as cached (the same
        # values as transformers' per-head copies, on the CPU). Multi-query keeps its one head, which SDPA
        # broadcasts, as in transformers.
        gqa = self.new_arch and k.shape[1] < self.num_heads
        bias = None
        if self.alibi:
            # As transformers: bfloat16 slopes times integer positions, in the model dtype, over sqrt(head_dim).
            positions = torch.arange(keys, device=x.device)
            slopes = alibi_slopes(self.all_heads, x.device)[
                self.head_offset : self.head_offset + self.num_heads
            ].bfloat16()
            bias = (slopes[:, None] * positions).to(x.dtype) / math.sqrt(self.head_dim)
            bias = bias[None, :, None, :]  # [1, heads, 1, keys]

        def attend(start: int, end: int) -> torch.Tensor:
            seen, rows = past + end, end - start
            qq, kk, vv = q[:, :, start:end], k[:, :, :seen], v[:, :, :seen]
            if bias is None and (rows == 1 or past + start == 0):
                if qq.is_cuda and not gqa and kk.shape[1] != qq.shape[1]:
                    kk, vv = fused_heads(kk, vv, qq.shape[1])  # multi-query: see fused_heads
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=rows > 1, enable_gqa=gqa)
            allowed = (
                torch.arange(seen, device=x.device) <= torch.arange(past + start, past + end, device=x.device)[:, None]
            )
            if bias is not None:
                allowed = bias[..., :seen].masked_fill(~allowed, torch.finfo(x.dtype).min)
            if qq.is_cuda and kk.shape[1] != qq.shape[1]:
                kk, vv = fused_heads(kk, vv, qq.shape[1])
                return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed)
            return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed, enable_gqa=gqa)

        row_bytes = batch * self.num_heads * keys * q.element_size()
        out = attend_in_chunks(attend, length, row_bytes, max_chunk_bytes)  # [B, heads, T, d]
        return self.self_attention.dense(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
