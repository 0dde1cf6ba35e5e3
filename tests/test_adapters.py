"""LoRA adapters (PROTOCOL 5.12): loaded from a directory made here with peft (or a local hub), selected
per request, published in ServerInfo; outputs equal peft's on the same transformers model (float32,
relative error 1e-5) for every family and peft's per-module options; requests with different adapters
(or none) batched at the same time each get their own; unknown names and wrong adapters are clear errors."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import safetensors.torch
import torch

from node.runtime import lora
from node.weights.checkpoint import Checkpoint
from node.client.swarm import Client
from node.tools.launcher import NodeProcess
from node.runtime.models import get_family
from tests.conftest import MICRO_LLAMA, SHARED, hf_blocks, on_two_gloo_ranks, rel_err

peft = pytest.importorskip("peft")
TOL = 1e-5


def make_adapter(base, path, seed: int, targets, rank: int = 4, alpha: float = 8.0, **options):
    """A LoRA adapter with random (non-zero) A and B, saved as peft saves it; returns the peft model."""
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **options)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(path))
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, micro_hf):
    base = tmp_path_factory.mktemp("adapters")
    first = make_adapter(micro_hf, base / "lora-qv", 1, ["q_proj", "v_proj"])
    second = make_adapter(micro_hf, base / "lora-mlp", 2, ["gate_proj", "down_proj", "o_proj"], rank=2, alpha=4.0)
    return {str(base / "lora-qv"): first, str(base / "lora-mlp"): second}


@pytest.fixture(scope="module")
def node(tmp_path_factory, adapters):
    with NodeProcess(MICRO_LLAMA, tmp_path_factory.mktemp("nodes") / "lora", "--adapters", *adapters, dht_prefix="micro-lora") as node:
        yield node


@pytest.fixture()
def client(node):
    with Client(node.maddrs, "micro-lora") as client:
        yield client


def reference(model, hidden, start, end):
    with torch.no_grad():
        return hf_blocks(model.base_model.model, hidden, start, end)


def test_adapters_are_published(client, adapters):
    assert set(client.spans(4)[0].info.adapters) == set(adapters)


def test_forward_with_each_adapter_equals_peft(client, adapters, micro_hf):
    torch.manual_seed(5)
    hidden = torch.randn(2, 6, 64)
    plain = client.forward(hidden, 0, 4)
    assert rel_err(plain, hf_blocks(micro_hf, hidden, 0, 4)) <= TOL  # no adapter: the base model
    for name, model in adapters.items():
        client.swarm.active_adapter = name
        out = client.forward(hidden, 0, 4)
        assert rel_err(out, reference(model, hidden, 0, 4)) <= TOL
        assert rel_err(out, plain) > 1e-3  # the adapter really changes the outputs
    client.swarm.active_adapter = None


def test_inference_with_an_adapter_equals_peft(client, adapters):
    name, model = next(iter(adapters.items()))
    client.swarm.active_adapter = name
    torch.manual_seed(6)
    hidden = torch.randn(1, 6, 64)
    with client.session(max_length=6, start=0, end=4) as session:
        steps = [session.step(hidden[:, :3])] + [session.step(hidden[:, t : t + 1]) for t in range(3, 6)]
    client.swarm.active_adapter = None
    assert rel_err(torch.cat(steps, 1), reference(model, hidden, 0, 4)) <= TOL


def test_backward_with_an_adapter_equals_peft(client, adapters):
    name, model = list(adapters.items())[1]
    client.swarm.active_adapter = name
    torch.manual_seed(7)
    hidden, grad_out = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    grad, _ = client.backward(hidden, grad_out, 0, 4)
    client.swarm.active_adapter = None
    leaf = hidden.clone().requires_grad_(True)
    hf_blocks(model.base_model.model, leaf, 0, 4).backward(grad_out)
    assert rel_err(grad, leaf.grad) <= TOL


def test_sessions_with_different_adapters_at_once(node, adapters, micro_hf):
    """Sessions stepping together are batched by the runtime: each must still get its own adapter."""
    names = [None, *adapters]
    torch.manual_seed(8)
    hidden = torch.randn(1, 8, 64)
    results, errors = {}, []

    def run(name):
        try:
            with Client(node.maddrs, "micro-lora") as client:
                client.swarm.active_adapter = name
                with client.session(max_length=8, start=0, end=4) as session:
                    results[name] = torch.cat([session.step(hidden[:, t : t + 1]) for t in range(8)], 1)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert rel_err(results[None], hf_blocks(micro_hf, hidden, 0, 4)) <= TOL
    for name, model in adapters.items():
        assert rel_err(results[name], reference(model, hidden, 0, 4)) <= TOL


def test_unknown_adapter_is_a_clear_error(client):
    client.swarm.active_adapter = "someone/else"
    try:
        with pytest.raises(RuntimeError, match="no ONLINE server with adapter someone/else"):
            client.forward(torch.randn(1, 2, 64), 0, 4)  # the client looks for servers that publish it
        (span,) = client.spans(4)
        with pytest.raises(Exception, match="adapter someone/else not found"):  # and the server refuses it
            client.forward_span(span, torch.randn(1, 2, 64))
        with pytest.raises(Exception, match="adapter someone/else not found"):
            with client.session(max_length=4, start=0, end=4, route=[span]) as session:
                session.step(torch.randn(1, 2, 64))
    finally:
        client.swarm.active_adapter = None


def test_adapter_on_quantized_blocks(tmp_path, adapters):
    name, model = next(iter(adapters.items()))
    with NodeProcess(MICRO_LLAMA, tmp_path / "lora-int8", "--quant_type", "int8", "--adapters", name, dht_prefix="micro-lora8") as node:
        with Client(node.maddrs, "micro-lora8") as client:
            client.swarm.active_adapter = name
            torch.manual_seed(9)
            hidden = torch.randn(1, 5, 64)
            out = client.forward(hidden, 0, 4)
    expected = reference(model, hidden, 0, 4)
    assert rel_err(out - hidden, expected - hidden) <= 0.05  # the int8 bound of tests/test_quantize.py


def test_node_measures_adapter_memory(node, adapters):
    """The runtime tries the adapters on an empty block 0 before joining; what they add to it counts in
    the memory of each block (PROTOCOL 5.3)."""
    events = [json.loads(line) for line in node.log_path.read_text().splitlines() if line.startswith("{")]
    (measured,) = [e for e in events if e.get("event") == "device measured"]
    expected = sum(p.numel() for model in adapters.values() for n, p in model.named_parameters() if "lora_" in n and ".layers.0." in n)
    assert measured["adapter_bytes"] == expected * 4 > 0


# --- blocks of every family against peft, without a node ------------------------------------------

# targets of each family's modules, attention and MLP (Mixtral: the experts)
FAMILY_TARGETS = {
    "micro-llama": ["k_proj", "o_proj", "up_proj"],
    "micro-bloom": ["query_key_value", "dense_4h_to_h"],  # BLOOM's checkpoint is bare (h.N.), peft's keys transformer.h.N.
    "micro-falcon": ["query_key_value", "dense", "dense_h_to_4h"],
    "micro-mixtral": ["v_proj", "w1", "w2"],
}


class Blocks:
    """A micro model's blocks loaded as the runtime loads them, adapters attached."""

    def __init__(self, model: str):
        self.checkpoint = Checkpoint.open(str(SHARED / "models" / model))
        self.config = self.checkpoint.config()
        self.family = get_family(self.config)

    def load(self, adapters, indices=None) -> list:
        blocks, added = [], 0
        for i in indices if indices is not None else range(self.config.num_hidden_layers):
            state = self.checkpoint.block_state(f"{self.family.block_prefix}.{i}.", dtype=torch.float32)
            block = self.family.block_class.from_state(self.config, state, dtype=torch.float32, device="cpu")
            added += lora.attach(block, i, self.family.block_prefix, adapters, torch.float32, "cpu")
            blocks.append(block)
        self.added = added
        return blocks

    @staticmethod
    def run(blocks, hidden, adapter):
        with torch.no_grad(), lora.activate(adapter):
            for block in blocks:
                hidden = block(hidden)
        return hidden


def hf_model(model: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(SHARED / "models" / model), dtype=torch.float32).eval()


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
    assert rel_err(Blocks.run(blocks, hidden, ""), hf_blocks(hf_model(model), hidden, 0, n)) <= TOL  # none: the base model


def test_per_module_rank_alpha_rslora_and_layers_equal_peft(tmp_path, micro_hf):
    options = dict(rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 16.0}, use_rslora=True, layers_to_transform=[1, 2])
    reference_model = make_adapter(micro_hf, tmp_path / "adapter", 13, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=6.0, **options)
    adapter = lora.load_adapter(str(tmp_path / "adapter"))
    ours = Blocks("micro-llama")
    blocks = ours.load([adapter])
    assert [type(b.self_attn.q_proj).__name__ for b in blocks] == ["Linear", "LoraLinear", "LoraLinear", "Linear"]
    assert blocks[1].self_attn.q_proj.lora_a[lora._key(adapter.name)].shape[0] == 2
    torch.manual_seed(14)
    hidden = torch.randn(1, 6, 64)
    assert rel_err(Blocks.run(blocks, hidden, adapter.name), reference(reference_model, hidden, 0, 4)) <= TOL


def test_adapter_from_a_hub(tmp_path, micro_hf):
    from tests.test_weight_cache import Hub, cache

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


def write_adapter(path, config: dict, tensors: dict) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / lora.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config}))
    safetensors.torch.save_file(tensors, str(path / lora.WEIGHTS_FILE))
    return str(path)


def test_wrong_adapters_are_clear_errors(tmp_path):
    ab = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 64),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 2)}
    (tmp_path / "empty").mkdir()
    with pytest.raises(lora.AdapterError, match="has no adapter_config.json"):
        lora.load_adapter(str(tmp_path / "empty"))
    for config, words in [({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "only LORA"),
                          ({"bias": "all"}, "biases"), ({"r": "x"}, "bad adapter_config.json")]:
        with pytest.raises(lora.AdapterError, match=words):
            lora.load_adapter(write_adapter(tmp_path / words.replace(" ", "_"), config, ab))
    blocks = Blocks("micro-llama")
    # weights for a module the block does not have: a model of another family, never silently dropped
    odd = write_adapter(tmp_path / "odd", {"target_modules": ["query_key_value"]},
                        {"base_model.model.model.layers.0.self_attn.query_key_value.lora_A.weight": torch.ones(2, 64),
                         "base_model.model.model.layers.0.self_attn.query_key_value.lora_B.weight": torch.ones(192, 2)})
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


def test_a_node_with_a_wrong_adapter_stops_before_joining(tmp_path):
    (tmp_path / "not-an-adapter").mkdir()
    node = NodeProcess(MICRO_LLAMA, tmp_path / "bad", "--adapters", str(tmp_path / "not-an-adapter"), dht_prefix="micro-badlora")
    node.launch()
    try:
        assert node.proc.wait(60) != 0
    finally:
        node.stop()
    log = node.log_path.read_text()
    assert "has no adapter_config.json" in log and '"state": "JOINING"' not in log


def test_adapters_whose_names_differ_only_in_dots_and_underscores(tmp_path, micro_hf):
    first = make_adapter(micro_hf, tmp_path / "lora.v1", 16, ["q_proj"])
    second = make_adapter(micro_hf, tmp_path / "lora_v1", 17, ["q_proj"])
    adapters = [lora.load_adapter(str(tmp_path / "lora.v1")), lora.load_adapter(str(tmp_path / "lora_v1"))]
    blocks = Blocks("micro-llama").load(adapters, [0])
    hidden = torch.randn(1, 3, 64)
    assert rel_err(Blocks.run(blocks, hidden, adapters[0].name), reference(first, hidden, 0, 1)) <= TOL
    assert rel_err(Blocks.run(blocks, hidden, adapters[1].name), reference(second, hidden, 0, 1)) <= TOL


def test_one_round_of_mixed_adapters_equals_each_alone(adapters):
    """The runtime's batching of a round (procs/runtime.Runtime.run) with sessions of two adapters and
    of none, interleaved: each output equals that session computed alone."""
    from types import SimpleNamespace

    from node.runtime import compute
    from procs.runtime import Runtime

    loaded = [lora.load_adapter(name) for name in adapters]
    blocks = Blocks("micro-llama").load(loaded)
    runtime = SimpleNamespace(blocks=blocks, plan=SimpleNamespace(max_chunk_size_bytes=1 << 30), group=None)
    names = [loaded[0].name, "", loaded[1].name, loaded[0].name, ""]
    torch.manual_seed(18)
    hiddens = [torch.randn(1, t, 64) for t in (3, 1, 2, 1, 4)]
    works = [compute.Work(0, 4, h) for h in hiddens]
    outputs = Runtime.run(runtime, works, names)
    for name, hidden, out in zip(names, hiddens, outputs):
        assert rel_err(out, Blocks.run(blocks, hidden, name)) <= TOL


# --- tensor parallelism: each rank holds its share of the LoRA weights -------------------------------


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
                errors["forward"] = rel_err(Blocks.run(shards, hidden, adapter.name), Blocks.run(whole, hidden, adapter.name))
                errors["grad"] = rel_err(compute.backward(shards, hidden, grad_out, None)[0],
                                         compute.backward(whole, hidden, grad_out, None)[0])
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


def test_tensor_parallel_node_with_adapters_equals_peft(tmp_path, adapters, micro_hf):
    with NodeProcess(MICRO_LLAMA, tmp_path / "lora-tp", "--tensor_parallel_devices", "cpu", "cpu", "--adapters", *adapters,
                     dht_prefix="micro-lora-tp") as node:
        with Client(node.maddrs, "micro-lora-tp") as client:
            assert set(client.spans(4)[0].info.adapters) == set(adapters)
            torch.manual_seed(10)
            hidden, grad_out = torch.randn(1, 6, 64), torch.randn(1, 6, 64)
            for name, model in adapters.items():
                client.swarm.active_adapter = name
                assert rel_err(client.forward(hidden, 0, 4), reference(model, hidden, 0, 4)) <= TOL
                with client.session(max_length=6, start=0, end=4) as session:
                    steps = [session.step(hidden[:, :4]), session.step(hidden[:, 4:])]
                assert rel_err(torch.cat(steps, 1), reference(model, hidden, 0, 4)) <= TOL
                grad, _ = client.backward(hidden, grad_out, 0, 4)
                leaf = hidden.clone().requires_grad_(True)
                hf_blocks(model.base_model.model, leaf, 0, 4).backward(grad_out)
                assert rel_err(grad, leaf.grad) <= TOL
