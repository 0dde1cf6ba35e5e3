"""LoRA adapters on blocks (PROTOCOL 5.12), no node: outputs equal peft's on the same transformers model
(float32, relative error 1e-5) for every family and peft's per-module options, on tensor-parallel shards
too; one batched round with several adapters equals each alone; wrong adapters are clear errors."""

from __future__ import annotations

import pytest
import torch

from node.runtime import lora
from tests.helpers.adapters import FAMILY_TARGETS, Blocks, hf_model, make_adapter, reference, write_adapter
from tests.helpers.gloo import on_two_gloo_ranks
from tests.helpers.reference import hf_blocks, rel_err

TOL = 1e-5


@pytest.mark.parametrize("model", list(FAMILY_TARGETS))
def test_blocks_of_every_family_equal_peft(tmp_path, model):
    reference_model = make_adapter(hf_model(model), tmp_path / "adapter", 11, FAMILY_TARGETS[model])
    adapter = lora.load_adapter(str(tmp_path / "adapter"))
    ours = Blocks(model)
    blocks = ours.load([adapter])
    assert ours.added == sum(p.numel() for n, p in reference_model.named_parameters() if "lora_" in n)
    torch.manual_seed(12)
    hidden = torch.randn(2, 5, ours.config.hidden_size)
    n = ours.config.num_hidden_layers
    expected = reference(reference_model, hidden, 0, n)
    assert rel_err(Blocks.run(blocks, hidden, adapter.name), expected) <= TOL
    assert rel_err(expected, hf_blocks(hf_model(model), hidden, 0, n)) > 1e-3  # the adapter really changes the outputs
    assert (
        rel_err(Blocks.run(blocks, hidden, ""), hf_blocks(hf_model(model), hidden, 0, n)) <= TOL
    )  # none: the base model


def test_per_module_rank_alpha_rslora_and_layers_equal_peft(tmp_path, micro_hf):
    options = dict(
        rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 16.0}, use_rslora=True, layers_to_transform=[1, 2]
    )
    reference_model = make_adapter(
        micro_hf, tmp_path / "adapter", 13, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=6.0, **options
    )
    adapter = lora.load_adapter(str(tmp_path / "adapter"))
    ours = Blocks("micro-llama")
    blocks = ours.load([adapter])
    assert [type(b.self_attn.q_proj).__name__ for b in blocks] == [
        "TunedLinear",
        "LoraLinear",
        "LoraLinear",
        "TunedLinear",
    ]
    assert blocks[1].self_attn.q_proj.lora_a[lora._key(adapter.name)].shape[0] == 2
    torch.manual_seed(14)
    hidden = torch.randn(1, 6, 64)
    assert rel_err(Blocks.run(blocks, hidden, adapter.name), reference(reference_model, hidden, 0, 4)) <= TOL


def test_adapter_from_a_hub(tmp_path, micro_hf):
    from tests.helpers.fake_hub import Hub, cache

    reference_model = make_adapter(micro_hf, tmp_path / "adapter", 15, ["q_proj"])
    hub = Hub()
    try:
        hub.add("org/lora", tmp_path / "adapter")
        adapter = lora.load_adapter("org/lora", weight_store=cache(tmp_path, hub))
        assert adapter.path.startswith(str(tmp_path / "cache"))
        blocks = Blocks("micro-llama").load([adapter], [0, 1])
        with pytest.raises(lora.AdapterError, match="org/nothing"):
            lora.load_adapter("org/nothing", weight_store=cache(tmp_path, hub))
    finally:
        hub.close()
    hidden = torch.randn(1, 3, 64)
    assert rel_err(Blocks.run(blocks, hidden, "org/lora"), reference(reference_model, hidden, 0, 2)) <= TOL


def test_wrong_adapters_are_clear_errors(tmp_path):
    ab = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 2),
    }
    (tmp_path / "empty").mkdir()
    with pytest.raises(lora.AdapterError, match="has no adapter_config.json"):
        lora.load_adapter(str(tmp_path / "empty"))
    for config, words in [
        ({"use_dora": True}, "use_dora"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"bias": "all"}, "biases"),
        ({"r": "x"}, "bad adapter_config.json"),
    ]:
        with pytest.raises(lora.AdapterError, match=words):
            lora.load_adapter(write_adapter(tmp_path / words.replace(" ", "_"), config, ab))
    blocks = Blocks("micro-llama")
    # weights for a module the block does not have: a model of another family, never silently dropped
    odd = write_adapter(
        tmp_path / "odd",
        {"target_modules": ["query_key_value"]},
        {
            "base_model.model.model.layers.0.self_attn.query_key_value.lora_A.weight": torch.ones(2, 64),
            "base_model.model.model.layers.0.self_attn.query_key_value.lora_B.weight": torch.ones(192, 2),
        },
    )
    with pytest.raises(lora.AdapterError, match="not a Linear of this node's block 0"):
        blocks.load([lora.load_adapter(odd)], [0])
    missing = write_adapter(tmp_path / "missing", {"target_modules": ["q_proj", "k_proj"]}, ab)
    with pytest.raises(lora.AdapterError, match="targets model.layers.0.self_attn.k_proj but has no LoRA weights"):
        blocks.load([lora.load_adapter(missing)], [0])
    shapes = write_adapter(tmp_path / "shapes", {"target_modules": ["q_proj"], "r": 3}, ab)
    with pytest.raises(lora.AdapterError, match="LoRA shapes"):
        blocks.load([lora.load_adapter(shapes)], [0])
    pattern = write_adapter(tmp_path / "pattern", {"target_modules": "model.layers.0.self_attn.(q_proj"}, ab)
    with pytest.raises(lora.AdapterError, match="bad pattern"):
        blocks.load([lora.load_adapter(pattern)], [0])


def test_adapters_whose_names_differ_only_in_dots_and_underscores(tmp_path, micro_hf):
    first = make_adapter(micro_hf, tmp_path / "lora.v1", 16, ["q_proj"])
    second = make_adapter(micro_hf, tmp_path / "lora_v1", 17, ["q_proj"])
    adapters = [lora.load_adapter(str(tmp_path / "lora.v1")), lora.load_adapter(str(tmp_path / "lora_v1"))]
    blocks = Blocks("micro-llama").load(adapters, [0])
    hidden = torch.randn(1, 3, 64)
    assert rel_err(Blocks.run(blocks, hidden, adapters[0].name), reference(first, hidden, 0, 1)) <= TOL
    assert rel_err(Blocks.run(blocks, hidden, adapters[1].name), reference(second, hidden, 0, 1)) <= TOL


def test_one_round_of_mixed_adapters_equals_each_alone(adapters):
    """The engine's batching of a round (node/runtime/engine.Engine.run) with sessions of two adapters and
    of none, interleaved: each output equals that session computed alone."""
    from types import SimpleNamespace

    from node.runtime import compute
    from node.runtime.engine import Engine

    loaded = [lora.load_adapter(name) for name in adapters]
    blocks = Blocks("micro-llama").load(loaded)
    engine = SimpleNamespace(blocks=blocks, plan=SimpleNamespace(max_chunk_size_bytes=1 << 30), grouped=False)
    names = [loaded[0].name, "", loaded[1].name, loaded[0].name, ""]
    torch.manual_seed(18)
    hiddens = [torch.randn(1, t, 64) for t in (3, 1, 2, 1, 4)]
    works = [compute.Work(0, 4, h) for h in hiddens]
    outputs = Engine.run(engine, works, names)
    for name, hidden, out in zip(names, hiddens, outputs):
        assert rel_err(out, Blocks.run(blocks, hidden, name)) <= TOL


def _tp_errors(rank: int, world: int, adapter_dirs: dict) -> dict:
    """On each of two gloo ranks: every family's blocks sharded, then its adapter attached (the runtime's
    order), forward and input gradients with the adapter active; rank 0's errors against the whole
    blocks with the same adapter."""
    from node.runtime import compute

    out = {}
    for model, path in adapter_dirs.items():
        try:
            adapter = lora.load_adapter(path)
            ours = Blocks(model)
            whole = ours.load([adapter])
            shards = []
            for i in range(ours.config.num_hidden_layers):
                state = ours.checkpoint.block_state(f"{ours.family.block_prefix}.{i}.", dtype=torch.float32)
                block = ours.family.block_class.from_state(ours.config, state, dtype=torch.float32, device="cpu")
                block = block.shard(rank, world, None)
                lora.attach(block, i, ours.family.block_prefix, [adapter], torch.float32, "cpu")
                shards.append(block)
            generator = torch.Generator().manual_seed(21)
            hidden = torch.randn(2, 5, ours.config.hidden_size, generator=generator)
            grad_out = torch.randn(2, 5, ours.config.hidden_size, generator=generator)
            errors = {}
            with lora.activate(adapter.name):
                errors["forward"] = rel_err(
                    Blocks.run(shards, hidden, adapter.name), Blocks.run(whole, hidden, adapter.name)
                )
                errors["grad"] = rel_err(
                    compute.backward(shards, hidden, grad_out, None)[0],
                    compute.backward(whole, hidden, grad_out, None)[0],
                )
            errors["changed"] = rel_err(Blocks.run(whole, hidden, adapter.name), Blocks.run(whole, hidden, ""))
            out[model] = errors
        except Exception as e:  # reported per family, not hung: the other rank fails the same way
            out[model] = repr(e)
    return out


def test_tensor_parallel_shards_with_adapters_equal_the_whole_blocks(tmp_path):
    dirs = {}
    for model, targets in FAMILY_TARGETS.items():
        make_adapter(hf_model(model), tmp_path / model, 31, targets)
        dirs[model] = str(tmp_path / model)
    errors = on_two_gloo_ranks(_tp_errors, str(tmp_path / "store"), dirs)
    for model in FAMILY_TARGETS:
        assert isinstance(errors[model], dict), (model, errors[model])
        assert errors[model]["forward"] <= TOL and errors[model]["grad"] <= TOL, (model, errors[model])
        assert errors[model]["changed"] > 1e-3, (model, errors[model])  # the adapter matters in these outputs
