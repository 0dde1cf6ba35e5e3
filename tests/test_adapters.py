"""LoRA adapters (PROTOCOL 5.12): loaded from a directory made here with peft, selected per request,
published in ServerInfo; outputs equal peft's on the same transformers model; requests with different
adapters (or none) batched at the same time each get their own; an unknown name is a clear error."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from node.client import Client
from node.launcher import NodeProcess
from tests.conftest import MICRO_LLAMA, hf_blocks, rel_err

peft = pytest.importorskip("peft")
TOL = 1e-5


def make_adapter(base, path, seed: int, targets, rank: int = 4, alpha: float = 8.0):
    """A LoRA adapter with random (non-zero) A and B, saved as peft saves it; returns the peft model."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
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
    with pytest.raises(Exception, match="adapter someone/else not found"):
        client.forward(torch.randn(1, 2, 64), 0, 4)
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
