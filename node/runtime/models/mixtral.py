"""One Mixtral block (PROTOCOL 4.1): Llama's attention (RoPE, GQA, sdpa numerics) with transformers'
sliding-window mask when `config.sliding_window` is set, and a sparse mixture-of-experts MLP routed as
transformers' MixtralSparseMoeBlock routes it (softmax over all experts in float32, top-k, the k weights
renormalized to sum to 1, experts summed in expert order).

Everything but the MLP and the window comes from LlamaBlock, batched forward included; the cache has
Llama's layout [B, num_key_value_heads, max_length, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from node.runtime.models.llama import LlamaBlock, repeat_kv


class _Expert(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(_Expert(config) for _ in range(config.num_local_experts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Any leading shape [..., H]: every token is routed on its own."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        weights = F.softmax(self.gate(x), dim=1, dtype=torch.float32)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # Expert by expert in index order, its tokens in (choice rank, token) order, as transformers adds them.
        for expert in chosen.unique().tolist():
            rank, token = torch.where(chosen.T == expert)
            y = self.experts[expert](x[token]) * weights[token, rank, None]
            out.index_add_(0, token, y.to(x.dtype))
        return out.view(shape)


class MixtralBlock(LlamaBlock):
    """Parameter names equal those under "model.layers.{i}." in Mixtral checkpoints."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        del self.mlp  # Llama's dense MLP; Mixtral has the experts instead
        self.block_sparse_moe = SparseMoE(config)
        self.sliding_window = getattr(config, "sliding_window", None)

    def _shard_mlp(self, rank: int, world: int, group) -> None:
        """Every rank routes every token (the router is small); each expert keeps its columns, and the
        mixture's output is reduced once."""
        from node.runtime.tensor_parallel import shard
        from node.runtime.tensor_parallel.split import even_split

        for expert in self.block_sparse_moe.experts:
            cols = slice(*even_split(expert.w1.out_features, world, "intermediate_size")[rank])
            expert.w1 = shard.sliced(expert.w1, rows=cols)
            expert.w3 = shard.sliced(expert.w3, rows=cols)
            expert.w2 = shard.sliced(expert.w2, cols=cols)
        self.block_sparse_moe = shard.Region(self.block_sparse_moe, group)

    def finish(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden = residual + self.self_attn.o_proj(attn)
        return hidden + self.block_sparse_moe(self.post_attention_layernorm(hidden))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
        """q [B, heads, t, d] at positions offset..offset+t-1 against k, v [B, kv, offset+t, d]. A query at
        position p sees keys (p - window, p], as transformers' sliding-window mask."""
        window = self.sliding_window
        t, keys = q.shape[2], k.shape[2]
        if window is None or keys <= window:
            return super()._sdpa(q, k, v, offset)
        first = max(0, offset - window + 1)  # no query of this step sees keys before this one
        k, v = k[:, :, first:], v[:, :, first:]
        if t == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scaling, enable_gqa=self.groups > 1)
        key_pos = torch.arange(first, keys, device=q.device)
        query_pos = torch.arange(offset, offset + t, device=q.device)[:, None]
        mask = (key_pos <= query_pos) & (key_pos > query_pos - window)
        return F.scaled_dot_product_attention(
            q, repeat_kv(k, self.groups), repeat_kv(v, self.groups), attn_mask=mask, scale=self.scaling
        )
