"""Tensor parallelism, block by block: two gloo ranks on the CPU, each holding its shard of every block
(node/runtime/tensor_parallel/shard.py), compute what the whole block computes, for every family and layout
the node serves:
forward, batched inference with caches (rollback and hypo_ids included) and backward with deep prompts."""

from __future__ import annotations

import copy

import pytest
import torch

from node.runtime import compute
from node.runtime.tensor_parallel.split import check_split, head_split, kv_heads_per_rank
from tests.helpers.families import VARIANTS, Model, hidden_states, make_model
from tests.helpers.gloo import on_two_gloo_ranks
from tests.helpers.reference import rel_err

TOL = 1e-5
TP_VARIANTS = dict(
    VARIANTS,
    llama_gqa=(
        "llama",
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96),
        "causal",
    ),
    # test_quantize's block: wide enough for its error bounds to hold on random weights
    llama_wide=(
        "llama",
        dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=1, intermediate_size=688),
        "causal",
    ),
)


def nan_cache(blocks, batch, max_length):
    return [tuple(torch.full(b.kv_cache_shape(batch, max_length), float("nan")) for _ in range(2)) for b in blocks]


def compare(model: Model, rank: int, world: int) -> dict[str, float]:
    """Every rank runs the same calls (the reductions pair them up); the errors are rank 0's."""
    whole = model.blocks
    shards = [copy.deepcopy(b).shard(rank, world, None) for b in whole]
    h, n = model.config.hidden_size, model.n
    errors = {}
    x = hidden_states(2, 13, h, seed=1)
    with torch.inference_mode():
        errors["forward"] = rel_err(
            compute.run(shards, [compute.Work(0, n, x)], 2**28)[0],
            compute.run(whole, [compute.Work(0, n, x)], 2**28)[0],
        )
        # two sessions in one pass, one with deep prompts, then a rollback with the rows swapped
        prompts = hidden_states(n * 2, 3, h, seed=11).view(n, 2, 3, h) * 0.5
        b = hidden_states(1, 9, h, seed=10)
        outputs = {}
        for name, blocks in (("shard", shards), ("whole", whole)):
            ca, cb = nan_cache(blocks, 2, 24), nan_cache(blocks, 1, 12)
            first = compute.run(
                blocks, [compute.Work(0, n, x[:, :10], ca, 0, prompts), compute.Work(0, n, b[:, :4], cb, 0)], 2**28
            )
            second = compute.run(
                blocks, [compute.Work(0, n, x[:, 10:], ca, 10), compute.Work(0, n, b[:, 4:], cb, 4)], 2**28
            )
            compute.reorder_cache(ca, torch.tensor([1, 0]))
            third = compute.run(blocks, [compute.Work(0, n, x[:, 3:6], ca, 8)], 2**28)
            outputs[name] = [first[0], second[0], third[0], first[1], second[1]]
        errors["inference"] = max(rel_err(a, b) for a, b in zip(outputs["shard"], outputs["whole"]))
    grad_out = hidden_states(2, 13, h, seed=4)
    prompts = hidden_states(n * 2, 3, h, seed=6).view(n, 2, 3, h) * 0.5
    gx, gp = compute.backward(shards, x, grad_out, prompts)
    rx, rp = compute.backward(whole, x, grad_out, prompts)
    errors["grad_inputs"], errors["grad_prompts"] = rel_err(gx, rx), rel_err(gp, rp)
    if hasattr(shards[0], "num_kv_heads"):
        errors["kv_heads"] = shards[0].kv_cache_shape(1, 1)[1]
    return errors


QUANTIZED = ("llama_wide",)


def quantized_errors(model: Model, rank: int, world: int) -> dict[str, float]:
    """Shard first, then quantize (node/runtime/loading.py load_blocks' order): every Linear of the shard, inside its
    Split/Reduce wrapper, becomes a bitsandbytes layer. The errors of the block's update, relative to the
    whole unquantized block's: the quantized shards' and the whole quantized block's."""
    from node.runtime.quantize import quantize_block
    from tests.helpers.quantization import plain_linears

    whole = model.blocks
    x = hidden_states(2, 7, model.config.hidden_size, seed=3)
    errors = {}
    for quant_type in ("int8", "nf4"):
        shards = [quantize_block(copy.deepcopy(b).shard(rank, world, None), quant_type, torch.float32) for b in whole]
        assert not any(plain_linears(s) for s in shards), "every Linear of the shard is quantized"
        whole_quantized = [quantize_block(copy.deepcopy(b), quant_type, torch.float32) for b in whole]
        with torch.inference_mode():
            expected = compute.run(whole, [compute.Work(0, model.n, x)], 2**28)[0]
            outputs = [
                compute.run(blocks, [compute.Work(0, model.n, x)], 2**28)[0] for blocks in (shards, whole_quantized)
            ]
        errors[quant_type] = [
            rel_err(out - x, expected - x) if torch.isfinite(out).all() else float("inf") for out in outputs
        ]
    return errors


def sharded(rank: int, world: int, paths: dict) -> dict:
    out = {}
    for name, path in paths.items():
        try:
            out[name] = compare(Model(path), rank, world)
            if name in QUANTIZED:
                out[name]["quantized"] = quantized_errors(Model(path), rank, world)
        except Exception as e:  # reported per variant, not hung: the other rank fails the same way
            out[name] = repr(e)
    return out


@pytest.fixture(scope="module")
def sharded_errors(tmp_path_factory):
    paths = {
        name: make_model(tmp_path_factory.mktemp(name), model_type, kwargs, layout)
        for name, (model_type, kwargs, layout) in TP_VARIANTS.items()
    }
    return on_two_gloo_ranks(sharded, str(tmp_path_factory.mktemp("tp") / "store"), paths)


@pytest.mark.parametrize("variant", sorted(TP_VARIANTS))
def test_two_ranks_equal_the_whole_block(sharded_errors, variant):
    errors = sharded_errors[variant]
    assert isinstance(errors, dict), errors
    print(variant, errors)
    for what in ("forward", "inference", "grad_inputs", "grad_prompts"):
        assert errors[what] <= TOL, (what, errors)


@pytest.mark.parametrize("variant", QUANTIZED)
def test_quantized_shards_stay_close(sharded_errors, variant):
    errors = sharded_errors[variant]
    assert isinstance(errors, dict), errors
    # each shard quantizes with its own statistics (row-parallel layers over half the inputs): about as
    # far from the unquantized block as the whole block quantized (the bound's slack is for the noise of
    # random weights), and within twice test_quantize's bounds
    from tests.helpers.quantization import BOUND

    for quant_type, (sharded, whole) in errors["quantized"].items():
        assert sharded <= 1.25 * whole + 0.02 and sharded <= 2 * BOUND[quant_type], (quant_type, errors["quantized"])


def test_kv_heads_split_by_whole_groups():
    assert head_split(8, 2, 2) == [(0, 4, 0, 1), (4, 8, 1, 2)]  # a KV head stays with its 4 query heads
    assert head_split(4, 1, 2) == [(0, 2, 0, 1), (2, 4, 0, 1)]  # multi-query: the one KV head on every rank
    assert kv_heads_per_rank(32, 8, 4) == 2 and kv_heads_per_rank(4, 1, 2) == 1 and kv_heads_per_rank(6, 6, 1) == 6
    with pytest.raises(ValueError, match="6 attention heads"):
        head_split(6, 6, 4)
    with pytest.raises(ValueError, match="3 KV heads"):
        head_split(6, 3, 2)


def test_check_split_names_what_does_not_divide():
    from transformers import AutoConfig

    from node.runtime.models import get_family

    config = AutoConfig.for_model(
        "llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=90
    )
    geometry = get_family(config).geometry(config)
    check_split(config, geometry, 1)
    with pytest.raises(ValueError, match="MLP width of 90"):
        check_split(config, geometry, 4)
