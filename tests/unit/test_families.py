"""BLOOM, Falcon and Mixtral blocks against transformers' models run whole (PROTOCOL 4.1-4.4, 7.3 item 13).

Each variant is a tiny random model made here with a fixed seed and saved as a checkpoint; our blocks load
it through Checkpoint like the runtime does, and transformers loads it with its default attention
(BLOOM: eager; Falcon, Mixtral: sdpa). The node-level tests (replays, generation) are in
tests/integration/test_conformance.py.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from node.client.generate import LocalHead
from node.runtime import compute
from node.runtime.models import get_family
from node.runtime.models.bloom import BloomBlock
from node.runtime.models.falcon import FalconBlock
from node.runtime.models.mixtral import MixtralBlock
from node.weights.checkpoint import Checkpoint
from tests.helpers.families import VARIANTS, Model, hidden_states, make_model
from tests.helpers.paths import SHARED
from tests.helpers.reference import hf_layers

TOL = 1e-5
BF16_TOL = 2e-2  # relative to the largest magnitude; bf16 has 8 bits of mantissa
ERRORS: dict[str, float] = {}  # "variant/what" -> largest relative error, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def print_errors():
    """The measured errors of this module, for the record (pytest -s shows them)."""
    yield
    for name in sorted(ERRORS):
        print(f"{name:40s} {ERRORS[name]:.3g}")


def check(name: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOL) -> None:
    a, b = ours.detach().double(), theirs.detach().double()
    err = ((a - b).abs().max() / b.abs().max()).item()
    ERRORS[name] = max(err, ERRORS.get(name, 0.0))
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request, tmp_path_factory):
    model_type, kwargs, layout = VARIANTS[request.param]
    m = Model(make_model(tmp_path_factory.mktemp(request.param), model_type, kwargs, layout))
    m.name = request.param
    return m


def test_forward_matches_hf(model):
    x = hidden_states(2, 21, model.config.hidden_size)
    with torch.no_grad():
        check(f"{model.name}/forward", model.ours(x), model.ref(x))
        check(f"{model.name}/forward", model.ours(x, 1), model.ref(x, 1))


def test_incremental_decoding_matches_full_forward(model):
    x = hidden_states(2, 24, model.config.hidden_size, seed=1)
    with torch.inference_mode():
        reference = model.ref(x)
        cache = model.new_cache(batch=2, max_length=32)
        lengths = [10, 1, 1, 1, 5, 1, 5]  # prefill, single tokens, multi-token steps with past > 0
        outputs, past = [], 0
        for length in lengths:
            outputs.append(model.step(x[:, past : past + length], cache, past))
            past += length
        check(f"{model.name}/inference", torch.cat(outputs, dim=1), reference)
        check(f"{model.name}/inference vs hf steps", torch.cat(outputs, dim=1), model.ref_steps(x, lengths))


def test_rollback_and_hypo_ids(model):
    """Prefill 16, then back to 12 with the rows swapped (hypo_ids [1, 0]), then 8 new tokens: equal to the
    whole swapped history run at once."""
    h = model.config.hidden_size
    x = hidden_states(2, 16, h, seed=2)
    y = hidden_states(2, 8, h, seed=5)
    with torch.inference_mode():
        cache = model.new_cache(batch=2, max_length=24)
        model.step(x[:, :13], cache, past=0)
        model.step(x[:, 13:16], cache, past=13)
        compute.reorder_cache(cache, torch.tensor([1, 0]))
        out = [model.step(y[:, :3], cache, past=12)]
        out += [model.step(y[:, t : t + 1], cache, past=12 + t) for t in range(3, 8)]
        reference = model.ref(torch.cat([x[[1, 0], :12], y], dim=1))[:, 12:]
        check(f"{model.name}/rollback+hypo_ids", torch.cat(out, dim=1), reference)


def test_sessions_with_deep_prompts_through_compute_run(model):
    """As the runtime runs them (node.runtime.compute.run): two sessions stepped together in one pass, one with deep
    prompts on its prefill (PROTOCOL 4.4), at different positions; each equals transformers on its own."""
    h, n = model.config.hidden_size, model.n
    a, b = hidden_states(2, 12, h, seed=9), hidden_states(1, 9, h, seed=10)
    prompts = hidden_states(n * 2, 3, h, seed=11).view(n, 2, 3, h) * 0.5
    with torch.inference_mode():
        cache_a, cache_b = model.new_cache(2, 12), model.new_cache(1, 9)
        works = [compute.Work(0, n, a[:, :10], cache_a, 0, prompts), compute.Work(0, n, b[:, :4], cache_b, 0)]
        first = compute.run(model.blocks, works, max_chunk_bytes=2**28)
        works = [compute.Work(0, n, a[:, 10:], cache_a, 10), compute.Work(0, n, b[:, 4:], cache_b, 4)]
        second = compute.run(model.blocks, works, max_chunk_bytes=2**28)
        check(f"{model.name}/prompts+batched", torch.cat([first[0], second[0]], dim=1), model.ref(a, prompts=prompts))
        check(f"{model.name}/prompts+batched", torch.cat([first[1], second[1]], dim=1), model.ref(b))


@pytest.mark.parametrize("kept", ["last", "two", "all"])
def test_input_and_prompt_gradients_match_hf(model, kept):
    """Whatever share of the forward's graphs fits in the memory for backward passes (the rest is run again),
    the gradients are autograd's through the whole model; each block runs once, plus once per block whose
    graph was not kept."""
    h, n = model.config.hidden_size, model.n
    x = hidden_states(2, 11, h, seed=3)
    prompts = hidden_states(n * 2, 3, h, seed=6).view(n, 2, 3, h) * 0.5
    grad_out = hidden_states(2, 11, h, seed=4)
    saved = compute.SavedBytes(model.blocks[0])
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        model.blocks[0](x.clone().requires_grad_(True))
    assert saved.total > 0
    keep = {"last": 1, "two": min(2, n), "all": n}[kept]
    runs = []
    hooks = [b.register_forward_hook(lambda *_: runs.append(1)) for b in model.blocks]
    try:
        grad_x, grad_prompts = compute.backward(model.blocks, x, grad_out, prompts, keep_bytes=keep * saved.total)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(runs) == n + (n - keep)

    leaf, leaf_prompts = x.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    ref_x, ref_prompts = torch.autograd.grad(model.ref(leaf, prompts=leaf_prompts), [leaf, leaf_prompts], grad_out)
    check(f"{model.name}/grad_inputs", grad_x, ref_x)
    check(f"{model.name}/grad_prompts", grad_prompts, ref_prompts)


def test_chunked_attention_equals_unchunked(model):
    x = hidden_states(2, 30, model.config.hidden_size, seed=7)
    heads = model.blocks[0].num_heads
    with torch.inference_mode():
        full = model.ours(x)
        for rows in [1, 7]:  # room for one or a few query rows at a time
            check(f"{model.name}/chunked", model.ours(x, max_chunk_bytes=rows * 2 * heads * 30 * 4), full)
        cache = model.new_cache(batch=2, max_length=30)
        first = model.step(x[:, :8], cache, past=0)
        rest = model.step(x[:, 8:], cache, past=8, max_chunk_bytes=3 * 2 * heads * 30 * 4)
        check(f"{model.name}/chunked", torch.cat([first, rest], dim=1), full)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bfloat16_matches_hf(variant, tmp_path):
    model_type, kwargs, layout = VARIANTS[variant]
    m = Model(make_model(tmp_path, model_type, kwargs, layout, dtype=torch.bfloat16), dtype=torch.bfloat16)
    x = hidden_states(2, 20, m.config.hidden_size, seed=8, dtype=torch.bfloat16)
    with torch.inference_mode():
        ours, reference = m.ours(x), m.ref(x)
        assert ours.dtype == torch.bfloat16
        check(f"{variant}/bf16 forward", ours, reference, BF16_TOL)
        cache = m.new_cache(batch=2, max_length=20)
        lengths = [12] + [1] * 8
        steps, past = [], 0
        for length in lengths:
            steps.append(m.step(x[:, past : past + length], cache, past))
            past += length
        # Against transformers' own bf16 incremental inference, and its bf16 full forward.
        check(f"{variant}/bf16 inference", torch.cat(steps, dim=1), m.ref_steps(x, lengths), BF16_TOL)
        check(f"{variant}/bf16 inference vs full", torch.cat(steps, dim=1), reference, BF16_TOL)


def test_from_state_is_strict_and_frozen(model):
    block = model.blocks[0]
    assert not block.training and all(not p.requires_grad for p in block.parameters())
    prefix = f"{model.family.block_prefix}.0."
    state = {
        k: v for k, v in model.hf.state_dict().items() if k.startswith(prefix) or k.startswith("transformer." + prefix)
    }
    state = {k.split(prefix, 1)[1]: v for k, v in state.items()}
    assert state.keys() == block.state_dict().keys()
    victim = sorted(state)[0]
    del state[victim]
    state["extra.weight"] = torch.ones(1)
    with pytest.raises(ValueError, match=rf"missing \['{victim}'\], unexpected \['extra.weight'\]"):
        model.family.block_class.from_state(model.config, state, dtype=torch.float32)


def test_registry_geometry_and_budget(model):
    config, family, block = model.config, model.family, model.blocks[0]
    geometry = family.geometry(config)
    assert block.kv_cache_shape(3, 50) == (3, geometry.num_kv_heads, 50, geometry.head_dim)
    assert geometry.num_heads == config.num_attention_heads
    expected = {  # (block class, block prefix, KV heads, kv groups as Petals budgets them: PROTOCOL 4.1, 5.7)
        "bloom": (BloomBlock, "h", config.num_attention_heads, 1),
        "bloom_post_ln_tp": (BloomBlock, "h", config.num_attention_heads, 1),
        "falcon_new_gqa": (FalconBlock, "transformer.h", 2, 4),
        "falcon_mqa": (FalconBlock, "transformer.h", 1, 4),
        "falcon_sequential": (FalconBlock, "transformer.h", 4, 1),
        "falcon_alibi": (FalconBlock, "transformer.h", 4, 1),
        "mixtral_window": (MixtralBlock, "model.layers", 2, 1),  # GQA in the cache, not in Petals' budget
    }[model.name]
    assert (
        family.block_class,
        family.block_prefix,
        geometry.num_kv_heads,
        family.kv_groups_for_budget(config),
    ) == expected
    assert len(hf_layers(model.hf)) == model.n


def test_default_dht_prefixes():
    """PROTOCOL 2.1: what each family announces under when served from a Hub repository."""
    config = {t: AutoConfig.for_model(t) for t in ("bloom", "falcon", "mixtral")}
    prefix = {t: get_family(c).default_dht_prefix for t, c in config.items()}
    assert prefix["bloom"]("bigscience/bloom-560m") == "bigscience/bloom-560m-petals"
    assert (
        prefix["bloom"]("bigscience/bloom-7b1-petals") == "bigscience/bloom-7b1-petals"
    )  # legacy alias, loaded as bloom-7b1
    assert prefix["bloom"]("bigscience/bloomz-1.1b") == "bigscience/bloomz-1-1b-petals"
    assert prefix["falcon"]("tiiuae/falcon-180B-chat") == "falcon-180B-chat"
    assert prefix["falcon"]("tiiuae/falcon-7.5b") == "falcon-7-5b"
    assert prefix["mixtral"]("mistralai/Mixtral-8x7B-Instruct-v0.1") == "mistralai/Mixtral-8x7B-Instruct-v0-1"


def test_bloom_checkpoint_layouts(tmp_path):
    """micro-bloom holds the bare model (h.N.*, tied head); a causal-LM copy (transformer.h.N.*) loads the same."""
    bare = SHARED / "models" / "micro-bloom"
    causal = tmp_path / "micro-bloom-causal"
    causal.mkdir()
    state = safetensors.torch.load_file(str(bare / "model.safetensors"))
    assert any(k.startswith("h.0.") for k in state) and not any(k.startswith("transformer.") for k in state)
    safetensors.torch.save_file(
        {"transformer." + k: v for k, v in state.items()}, str(causal / "model.safetensors"), metadata={"format": "pt"}
    )
    config = json.loads((bare / "config.json").read_text())
    (causal / "config.json").write_text(json.dumps({**config, "architectures": ["BloomForCausalLM"]}))

    for index in range(4):
        a = Checkpoint.open(str(bare)).block_state(f"h.{index}.", dtype=torch.float32)
        b = Checkpoint.open(str(causal)).block_state(f"h.{index}.", dtype=torch.float32)
        assert a.keys() == b.keys() and "self_attention.query_key_value.weight" in a
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="no tensors start with 'h.9.'"):
        Checkpoint.open(str(bare)).block_state("h.9.", dtype=torch.float32)

    # The client head: embeddings, then BLOOM's word_embeddings_layernorm; the LM head tied to the embeddings.
    hf = AutoModelForCausalLM.from_pretrained(str(bare), dtype=torch.float32).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    seen = {}
    hook = hf_layers(hf)[0].register_forward_pre_hook(lambda m, args: seen.update(block0_input=args[0]))
    with torch.no_grad():
        hf(ids)
    hook.remove()
    for path in (bare, causal):
        head = LocalHead(str(path))
        hidden = head.embed(ids)
        assert torch.equal(hidden, seen["block0_input"])
        with torch.no_grad():
            assert torch.equal(head.logits(hidden), hf.lm_head(hf.transformer.ln_f(hidden)))
