"""LlamaBlock against transformers' LlamaForCausalLM run whole (PROTOCOL 4.1, 4.2)."""

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from node.runtime.models import get_family
from node.runtime.models.llama import LlamaBlock, Rotary
from node.tools.tinymodel import make_tiny_llama
from node.weights.checkpoint import Checkpoint
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import rel_err

MICRO = str(MICRO_LLAMA)
TOL = 1e-5
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# Small enough to be fast, sharp enough (init std 0.1) that attention is far from uniform.
VARIANTS = {
    "llama3": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, rope_scaling=LLAMA3),
    "gqa_bias_headdim": dict(
        hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=24, attention_bias=True, mlp_bias=True
    ),
    "linear": dict(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
}


class _Stop(Exception):
    pass


class Model:
    """A checkpoint loaded both ways: our blocks and the HF reference."""

    def __init__(self, path: str, dtype=torch.float32):
        self.checkpoint = Checkpoint.open(path)
        self.config = self.checkpoint.config()
        family = get_family(self.config)
        self.blocks = [
            family.block_class.from_state(
                self.config, self.checkpoint.block_state(f"model.layers.{i}.", dtype=dtype), dtype=dtype, device="cpu"
            )
            for i in range(self.config.num_hidden_layers)
        ]
        self.hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def hf_span(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """HF layers [start, end) applied to `hidden` at positions 0..T-1, within the whole model's forward."""
        captured = {}

        def replace_input(module, args, kwargs):
            return (hidden,) + args[1:], kwargs

        def capture_output(module, args, output):
            captured["out"] = output[0] if isinstance(output, tuple) else output
            raise _Stop  # the rest of the model is not needed

        hooks = [
            self.hf.model.layers[start].register_forward_pre_hook(replace_input, with_kwargs=True),
            self.hf.model.layers[end - 1].register_forward_hook(capture_output),
        ]
        try:
            self.hf(inputs_embeds=torch.zeros_like(hidden), use_cache=False)
        except _Stop:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        return captured["out"]

    def ours(self, hidden: torch.Tensor, start: int, end: int, **kwargs) -> torch.Tensor:
        for block in self.blocks[start:end]:
            hidden = block(hidden, **kwargs)
        return hidden

    def new_cache(self, start, end, batch, max_length, dtype=torch.float32):
        # NaN, not zeros: slots beyond the valid prefix must never reach the output.
        return [
            tuple(torch.full(b.kv_cache_shape(batch, max_length), float("nan"), dtype=dtype) for _ in range(2))
            for b in self.blocks[start:end]
        ]

    def step(self, hidden, start, end, cache, past, **kwargs):
        for block, kv in zip(self.blocks[start:end], cache):
            hidden = block(hidden, cache=kv, past=past, **kwargs)
        return hidden


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_llama(str(path), initializer_range=0.1, vocab_size=64, seed=3, **VARIANTS[request.param])
    return Model(str(path))


@pytest.fixture(scope="module")
def micro():
    return Model(MICRO)


def hidden_states(batch, length, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, size, generator=g)


def test_forward_matches_hf(model):
    n = model.config.num_hidden_layers
    x = hidden_states(2, 45, model.config.hidden_size)
    with torch.no_grad():
        for start, end in [(0, n), (1, n), (0, n - 1)]:
            assert rel_err(model.ours(x, start, end), model.hf_span(x, start, end)) <= TOL


def test_micro_llama_matches_hf(micro):
    assert micro.config.rope_scaling["rope_type"] == "llama3"
    x = hidden_states(3, 40, micro.config.hidden_size)
    with torch.no_grad():
        assert rel_err(micro.ours(x, 0, 4), micro.hf_span(x, 0, 4)) <= TOL
        assert rel_err(micro.ours(x, 1, 3), micro.hf_span(x, 1, 3)) <= TOL


def test_incremental_decoding_matches_full_forward(model):
    n = model.config.num_hidden_layers
    x = hidden_states(2, 24, model.config.hidden_size, seed=1)
    with torch.inference_mode():
        reference = model.hf_span(x, 0, n)
        cache = model.new_cache(0, n, batch=2, max_length=32)
        outputs, past = [], 0
        for length in [10, 1, 1, 1, 5, 1, 5]:  # prefill, single tokens, multi-token steps with past > 0
            outputs.append(model.step(x[:, past : past + length], 0, n, cache, past))
            past += length
        assert past == x.shape[1]
        assert rel_err(torch.cat(outputs, dim=1), reference) <= TOL


def test_rollback_rewrites_slots(model):
    n = model.config.num_hidden_layers
    x = hidden_states(1, 20, model.config.hidden_size, seed=2)
    y = x.clone()
    y[:, 12:] = hidden_states(1, 8, model.config.hidden_size, seed=5)
    with torch.inference_mode():
        cache = model.new_cache(0, n, batch=1, max_length=20)
        model.step(x[:, :16], 0, n, cache, past=0)
        model.step(x[:, 16:20], 0, n, cache, past=16)
        # Go back to 12 tokens and continue differently: slots 12.. are overwritten.
        out = [model.step(y[:, 12:15], 0, n, cache, past=12)]
        out += [model.step(y[:, t : t + 1], 0, n, cache, past=t) for t in range(15, 20)]
        assert rel_err(torch.cat(out, dim=1), model.hf_span(y, 0, n)[:, 12:]) <= TOL


def test_input_gradient_matches_hf(model):
    n = model.config.num_hidden_layers
    x = hidden_states(2, 17, model.config.hidden_size, seed=3)
    grad_out = hidden_states(2, 17, model.config.hidden_size, seed=4)

    leaf = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(model.ours(leaf, 0, n), leaf, grad_out)
    leaf = x.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(model.hf_span(leaf, 0, n), leaf, grad_out)
    assert rel_err(ours, theirs) <= TOL


def test_chunked_attention_equals_unchunked(model):
    n = model.config.num_hidden_layers
    x = hidden_states(2, 30, model.config.hidden_size, seed=6)
    block = model.blocks[0]
    with torch.inference_mode():
        full = model.ours(x, 0, n)
        # Room for one or a few query rows at a time.
        for chunk_rows in [1, 7]:
            budget = chunk_rows * 2 * block.num_heads * 30 * 4
            assert rel_err(model.ours(x, 0, n, max_chunk_bytes=budget), full) <= TOL
        cache = model.new_cache(0, n, batch=2, max_length=30)
        first = model.step(x[:, :8], 0, n, cache, past=0)
        rest = model.step(x[:, 8:], 0, n, cache, past=8, max_chunk_bytes=3 * 2 * block.num_heads * 30 * 4)
        assert rel_err(torch.cat([first, rest], dim=1), full) <= TOL


def test_a_cpu_prefill_with_no_past_attends_in_one_call_whatever_the_budget(model, monkeypatch):
    """No earlier positions: one causal SDPA call (the CPU's flash kernel holds no scores), equal to the
    output in chunks that a budget of a few rows would otherwise cut."""
    import torch.nn.functional as F

    n = model.config.num_hidden_layers
    x = hidden_states(2, 30, model.config.hidden_size, seed=8)
    block = model.blocks[0]
    with torch.inference_mode():
        full = model.ours(x, 0, n)
        calls = []
        sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or sdpa(*a, **k))
        tiny = model.ours(x, 0, n, max_chunk_bytes=2 * block.num_heads * 30 * 4)  # room for one query row
    assert len(calls) == n and all(k.get("is_causal") for k in calls)
    assert rel_err(tiny, full) <= TOL


LONG_ROPES = {
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "yarn": dict(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        max_position_embeddings=64,
    ),
    "longrope": dict(
        rope_scaling={
            "rope_type": "longrope",
            "factor": 4.0,
            "short_factor": [1 + 0.1 * i for i in range(8)],
            "long_factor": [2 + 0.3 * i for i in range(8)],
        },
        max_position_embeddings=64,
        original_max_position_embeddings=16,
    ),
}


@pytest.mark.parametrize("rope", sorted(LONG_ROPES))
def test_length_dependent_rope_types(tmp_path, rope):
    path = make_tiny_llama(
        str(tmp_path),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=64,
        initializer_range=0.1,
        **LONG_ROPES[rope],
    )
    m = Model(path)
    with torch.no_grad():
        for length in [10, 40]:  # within, then beyond the original context: dynamic/longrope switch frequencies
            x = hidden_states(1, length, 64, seed=length)
            assert rel_err(m.ours(x, 0, 2), m.hf_span(x, 0, 2)) <= TOL


def test_bfloat16_matches_hf(tmp_path):
    path = make_tiny_llama(str(tmp_path), **VARIANTS["llama3"], vocab_size=64, initializer_range=0.1)
    m = Model(path, dtype=torch.bfloat16)
    x = hidden_states(2, 20, 128, seed=8).to(torch.bfloat16)
    with torch.no_grad():
        ours, theirs = m.ours(x, 0, 4), m.hf_span(x, 0, 4)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, theirs) <= 1e-2  # same op order as HF: in practice identical


def test_from_state_is_frozen_and_strict(micro):
    block = micro.blocks[0]
    assert not block.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in block.parameters())
    assert block.kv_cache_shape(3, 50) == (3, 2, 50, 16)
    assert (block.num_kv_heads, block.head_dim, block.hidden_size) == (2, 16, 64)
    state = Checkpoint.open(MICRO).block_state("model.layers.0.", dtype=torch.float32)
    state["self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # found in old checkpoints; ignored
    LlamaBlock.from_state(micro.config, state, dtype=torch.float32, device="cpu")
    del state["mlp.up_proj.weight"]
    state["mlp.extra"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"missing \['mlp.up_proj.weight'\], unexpected \['mlp.extra'\]"):
        LlamaBlock.from_state(micro.config, state, dtype=torch.float32, device="cpu")


def test_rotary_table_grows_on_demand(micro):
    rotary = Rotary(micro.config)
    cos, sin = rotary.get(0, 10, "cpu", torch.float32)
    assert cos.shape == (10, 16)
    table = rotary.tables[("base", torch.device("cpu"), torch.float32)]
    rotary.get(200, 1, "cpu", torch.float32)  # within the first allocation: no recomputation
    assert rotary.tables[("base", torch.device("cpu"), torch.float32)] is table
    cos_far, _ = rotary.get(1000, 1, "cpu", torch.float32)
    assert rotary.tables[("base", torch.device("cpu"), torch.float32)][0].shape[0] >= 1001
    assert torch.equal(rotary.get(0, 10, "cpu", torch.float32)[0], cos)
    assert torch.equal(cos_far, Rotary(micro.config).get(1000, 1, "cpu", torch.float32)[0])
    # All blocks of a model share one table.
    assert micro.blocks[0].rotary is micro.blocks[3].rotary


def test_family_registry(micro):
    family = get_family(micro.config)
    assert family.name == "llama" and family.block_prefix == "model.layers" and family.block_class is LlamaBlock
    assert family.kv_groups_for_budget(micro.config) == 2
    assert family.default_dht_prefix("meta-llama/Meta-Llama-3.1-405B-Instruct") == "Meta-Llama-3-1-405B-Instruct-hf"
    assert family.default_dht_prefix("meta-llama/Llama-2-70b-chat-hf") == "Llama-2-70b-chat-hf"
    assert family.default_dht_prefix("local-model") == "local-model-hf"
    other = type(micro.config)()
    other.model_type = "gpt2"
    with pytest.raises(ValueError, match="gpt2"):
        get_family(other)


def test_tiny_model_is_deterministic(tmp_path):
    a = make_tiny_llama(str(tmp_path / "a"), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=16)
    b = make_tiny_llama(str(tmp_path / "b"), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=16)
    sa = Checkpoint.open(a).block_state("model.layers.0.", dtype=torch.float32)
    sb = Checkpoint.open(b).block_state("model.layers.0.", dtype=torch.float32)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert math.isclose(float(sa["input_layernorm.weight"].std()), 0.1, rel_tol=0.9)  # perturbed, not all ones


def test_backward_after_inference_mode_step(micro):
    """The runtime serves inference steps (inference mode) and backward passes with the same blocks."""
    block = LlamaBlock.from_state(
        micro.config,
        Checkpoint.open(MICRO).block_state("model.layers.0.", dtype=torch.float32),
        dtype=torch.float32,
        device="cpu",
    )
    block.rotary = Rotary(micro.config)  # fresh: its table is first built inside inference mode
    x = hidden_states(1, 6, 64, seed=9)
    with torch.inference_mode():
        block(x, cache=tuple(torch.zeros(block.kv_cache_shape(1, 8)) for _ in range(2)), past=0)
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(block(leaf).sum(), leaf)
    assert grad.shape == x.shape and torch.isfinite(grad).all()
