"""One Llama decoder layer in plain torch (PROTOCOL 4.1), numerically matching transformers'
LlamaDecoderLayer with its default "sdpa" attention, plus a server-side KV cache (PROTOCOL 4.2).

The forward is split into token-wise steps (`project_qkv`, `finish`) that work on any leading shape,
including a flat [N, H] batch of tokens from several sessions, and a per-sequence step (`attend`)
that runs one session's queries against that session's own cache.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from node.runtime.models.common import DEFAULT_MAX_CHUNK_BYTES, Block, Segment, check_cache

KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as HF (normalize in fp32, cast back, then scale) so bf16 results match bit for bit.
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary:
    """cos/sin of absolute positions, grown on demand and shared by all blocks of one model, so a
    decode step only slices a table and 80 blocks do not keep 80 copies of it."""

    _shared: dict[str, "Rotary"] = {}
    _lock = threading.Lock()

    @classmethod
    def for_config(cls, config: PretrainedConfig) -> "Rotary":
        key = config.to_json_string(use_diff=False)
        with cls._lock:
            if key not in cls._shared:
                cls._shared[key] = cls(config)
            return cls._shared[key]

    def __init__(self, config: PretrainedConfig):
        self.config = config
        scaling = getattr(config, "rope_scaling", None)
        self.rope_type = (
            scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
        )
        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope type {self.rope_type!r}")
        self.init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        # The length beyond which "dynamic" and "longrope" switch frequencies, as HF's dynamic_rope_update does.
        if self.rope_type == "longrope":
            self.switch_len = (
                getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
            )
        else:
            self.switch_len = config.max_position_embeddings
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (variant, device, dtype) -> cos, sin

    def _freqs(self, variant: str, seq_len: int, device) -> tuple[torch.Tensor, float]:
        if variant == "base":
            return self.init_fn(self.config, device)
        if variant == "long":
            inv_freq, _ = self.init_fn(self.config, device, seq_len=self.switch_len + 1)
            _, scaling = self.init_fn(self.config, device)  # HF keeps the scaling from initialization
            return inv_freq, scaling
        return self.init_fn(self.config, device, seq_len=seq_len)  # "dynamic" beyond the original length

    @staticmethod
    def _cos_sin(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(positions.float(), inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling

    def get(self, start: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of positions [start, start+length) as [length, head_dim] in `dtype`; `start+length`
        is also the sequence length that "dynamic"/"longrope" scaling depends on, as in HF."""
        seq_len = start + length
        device = torch.device(device)
        variant = "base"
        if seq_len > self.switch_len:
            if "dynamic" in self.rope_type:
                # Frequencies depend on this step's length: nothing worth caching.
                inv_freq, scaling = self._freqs("dynamic", seq_len, device)
                positions = torch.arange(start, seq_len, device=device)
                cos, sin = self._cos_sin(inv_freq, scaling, positions)
                return cos.to(dtype), sin.to(dtype)
            if self.rope_type == "longrope":
                variant = "long"
        key = (variant, device, dtype)
        table = self.tables.get(key)
        if table is None or table[0].shape[0] < seq_len:
            table = self._grow(variant, seq_len, device, dtype)
        return table[0][start:seq_len], table[1][start:seq_len]

    # Tables built during an inference step are reused by later backward passes, and tensors created
    # in inference mode cannot be saved for backward: build them as ordinary tensors.
    @torch.inference_mode(False)
    @torch.no_grad()
    def _grow(self, variant: str, seq_len: int, device: torch.device, dtype: torch.dtype):
        master_key = (variant, device, torch.float32)
        master = self.tables.get(master_key)
        if master is None or master[0].shape[0] < seq_len:
            have = 0 if master is None else master[0].shape[0]
            size = max(seq_len, 2 * have, 256)
            inv_freq, scaling = self._freqs(variant, size, device)
            master = self._cos_sin(inv_freq, scaling, torch.arange(size, device=device))
            # Drop casts of the old, shorter table; they are rebuilt from the new one below.
            self.tables = {k: v for k, v in self.tables.items() if k[:2] != (variant, device)}
            self.tables[master_key] = master
        table = (master[0].to(dtype), master[1].to(dtype))
        self.tables[(variant, device, dtype)] = table
        return table


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, n_kv, S, d] -> [B, n_kv * groups, S, d], each KV head serving `groups` consecutive query heads."""
    if groups == 1:
        return x
    b, n, s, d = x.shape
    return x[:, :, None].expand(b, n, groups, s, d).reshape(b, n * groups, s, d)


class _Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        bias = getattr(config, "attention_bias", False)
        h = config.hidden_size
        self.q_proj = nn.Linear(h, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(h, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(h, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, h, bias=bias)


class _MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(Block):
    """Parameter names equal those under "model.layers.{i}." in HF checkpoints.
    `pretraining_tp` is ignored (treated as 1), as Petals does."""

    STATE_IGNORE = ("rotary_emb.inv_freq",)  # old checkpoints store the rotary frequencies: derived here instead
    DTYPE_FROM = "self_attn.q_proj"

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.input_layernorm = RMSNorm(self.hidden_size, config.rms_norm_eps)
        self.self_attn = _Attention(config, self.num_heads, self.num_kv_heads, self.head_dim)
        self.post_attention_layernorm = RMSNorm(self.hidden_size, config.rms_norm_eps)
        self.mlp = _MLP(config)
        self.rotary = Rotary.for_config(config)

    def shard(self, rank: int, world: int, group) -> "LlamaBlock":
        """Keep this rank's query heads with their KV heads, and its MLP columns
        (node/runtime/tensor_parallel/shard.py)."""
        from node.runtime.tensor_parallel import shard
        from node.runtime.tensor_parallel.split import head_split

        heads = head_split(self.num_heads, self.num_kv_heads, world)[rank]
        attn, d = self.self_attn, self.head_dim
        q_rows, kv_rows = shard.head_rows(heads.q0, heads.q1, d), shard.head_rows(heads.kv0, heads.kv1, d)
        attn.q_proj = shard.column(attn.q_proj, q_rows, group)
        attn.k_proj = shard.column(attn.k_proj, kv_rows, group)
        attn.v_proj = shard.column(attn.v_proj, kv_rows, group)
        attn.o_proj = shard.row(attn.o_proj, q_rows, group)
        self.num_heads, self.num_kv_heads = heads.q1 - heads.q0, heads.kv1 - heads.kv0
        self.groups = self.num_heads // self.num_kv_heads
        self._shard_mlp(rank, world, group)
        return self

    def _shard_mlp(self, rank: int, world: int, group) -> None:
        from node.runtime.tensor_parallel import shard

        shard.mlp(self.mlp, ("gate_proj", "up_proj"), "down_proj", rank, world, "intermediate_size", group)

    def kv_cache_shape(self, batch: int, max_length: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, max_length, self.head_dim)

    # --- token-wise steps: any leading shape, e.g. a flat [N, H] batch of several sessions ------

    def project_qkv(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [..., H] and cos/sin [..., head_dim] of each token's position ->
        rotated q [..., heads, d], rotated k [..., kv_heads, d], v [..., kv_heads, d]."""
        x = self.input_layernorm(hidden)
        lead = x.shape[:-1]
        q = self.self_attn.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.self_attn.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.self_attn.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def finish(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attention output [..., heads*d] and the block input [..., H] -> block output [..., H]."""
        hidden = residual + self.self_attn.o_proj(attn)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    # --- per-sequence attention ------------------------------------------------------------------

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
        """q [B, heads, t, d] at positions offset..offset+t-1 against k, v [B, kv, offset+t, d]."""
        t = q.shape[2]
        if t == 1 or offset == 0:
            # As HF does when no mask is needed: let SDPA do causality and GQA itself.
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=t > 1, scale=self.scaling, enable_gqa=self.groups > 1
            )
        keys = k.shape[2]
        mask = torch.arange(keys, device=q.device) <= torch.arange(offset, offset + t, device=q.device)[:, None]
        return F.scaled_dot_product_attention(
            q, repeat_kv(k, self.groups), repeat_kv(v, self.groups), attn_mask=mask, scale=self.scaling
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        past: int,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> torch.Tensor:
        """One sequence (batch of B rows sharing `past`): q [B, heads, T, d] at positions past..past+T-1,
        k, v [B, kv, past+T, d] (cache plus the new tokens) -> [B, heads, T, d]."""
        batch, _, length, _ = q.shape
        keys = k.shape[2]
        row_bytes = batch * self.num_heads * keys * q.element_size()
        chunk = max(1, max_chunk_bytes // row_bytes)
        if chunk >= length or (past == 0 and q.device.type == "cpu"):
            # With no earlier positions SDPA needs no mask, and on the CPU it then runs its flash kernel,
            # which never holds the scores: chunks would only add each chunk's mask and scores (an
            # 8192-token forward of the micro model: 185 MiB and 0.53 s in chunks of 256 MiB, 71 MiB and
            # 0.27 s in one call). On a GPU a kernel without GQA or this dtype falls back to one that
            # holds them all, so there the chunks stay.
            return self._sdpa(q, k, v, past)
        # Bounded score memory: each chunk of queries sees the cache plus all earlier chunks.
        outputs = []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            outputs.append(self._sdpa(q[:, :, start:end], k[:, :, : past + end], v[:, :, : past + end], past + start))
        return torch.cat(outputs, dim=2)

    # --- the whole block ---------------------------------------------------------------------------

    def compute(self, hidden: torch.Tensor, cache: Optional[KV], past: int, max_chunk_bytes: int) -> torch.Tensor:
        batch, length, _ = hidden.shape
        cos, sin = self.rotary.get(past, length, hidden.device, hidden.dtype)
        q, k, v = self.project_qkv(hidden, cos, sin)  # [B, T, n, d]
        attn = self._attend_cached(q, k, v, cache, past, max_chunk_bytes)
        return self.finish(attn, hidden)

    def forward_segments(
        self, segments: Sequence[Segment], max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    ) -> list[torch.Tensor]:
        """Several sequences (sessions) at once: their tokens go through the projections and the MLP as
        one [N, H] batch, while each attends to its own cache at its own positions."""
        if len(segments) == 1:
            s = segments[0]
            return [self.forward(s.hidden, s.cache, s.past, max_chunk_bytes)]
        device = segments[0].hidden.device
        flat, cos, sin = [], [], []
        for s in segments:
            batch, length, _ = s.hidden.shape
            check_cache(length, s.cache, s.past)
            flat.append(s.hidden.to(self.dtype).reshape(batch * length, self.hidden_size))
            c, si = self.rotary.get(s.past, length, device, self.dtype)
            cos.append(c.expand(batch, length, self.head_dim).reshape(batch * length, self.head_dim))
            sin.append(si.expand(batch, length, self.head_dim).reshape(batch * length, self.head_dim))
        flat = torch.cat(flat)
        q, k, v = self.project_qkv(flat, torch.cat(cos), torch.cat(sin))  # [N, n, d]
        attn, offset = [], 0
        for s in segments:
            batch, length, _ = s.hidden.shape
            rows = slice(offset, offset + batch * length)
            offset += batch * length
            shape = (batch, length, -1, self.head_dim)
            out = self._attend_cached(
                q[rows].view(shape), k[rows].view(shape), v[rows].view(shape), s.cache, s.past, max_chunk_bytes
            )
            attn.append(out.reshape(batch * length, -1))
        out = self.finish(torch.cat(attn), flat)
        sizes = [s.hidden.shape[0] * s.hidden.shape[1] for s in segments]
        return [part.view(*s.hidden.shape[:2], self.hidden_size) for part, s in zip(torch.split(out, sizes), segments)]

    def _attend_cached(self, q, k, v, cache: Optional[KV], past: int, max_chunk_bytes: int) -> torch.Tensor:
        """q [B, T, heads, d], k and v [B, T, kv, d] of one sequence -> attention output [B, T, heads*d],
        with the new keys/values stored in the cache slots [past, past+T) first."""
        batch, length = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, n, T, d]
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, past : past + length] = k
            v_cache[:, :, past : past + length] = v
            # Slots past past+T may hold garbage (even NaN) from other steps: never let them in.
            k, v = k_cache[:, :, : past + length], v_cache[:, :, : past + length]
        attn = self.attend(q, k, v, past, max_chunk_bytes)
        return attn.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
