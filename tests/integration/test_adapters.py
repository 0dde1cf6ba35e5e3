"""LoRA adapters served by a node (PROTOCOL 5.12): published in ServerInfo, selected per request, outputs
equal peft's on the same transformers model (float32, relative error 1e-5) in forward, inference and
backward, sessions with different adapters at once each get their own, on quantized blocks and on a
tensor-parallel node; unknown names and wrong adapters are clear errors before the node joins."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import torch

from node.client.swarm import Client
from node.tools.launcher import NodeProcess
from tests.helpers.adapters import reference
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import hf_blocks, rel_err
from tests.helpers.waiting import wait_until

peft = pytest.importorskip("peft")
TOL = 1e-5


@pytest.fixture(scope="module")
def node(tmp_path_factory, adapters):
    with NodeProcess(
        MICRO_LLAMA, tmp_path_factory.mktemp("nodes") / "lora", "--adapters", *adapters, dht_prefix="micro-lora"
    ) as node:
        yield node


@pytest.fixture()
def client(node):
    with Client(node.maddrs, "micro-lora") as client:
        yield client


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


def test_an_adapter_session_survives_a_runtime_kill(node, client, adapters):
    """The cache rebuilt on a replaced runtime is computed with the session's adapter (issue 13)."""
    name, model = list(adapters.items())[1]
    client.swarm.active_adapter = name
    torch.manual_seed(8)
    hidden = torch.randn(1, 8, 64)
    with client.session(max_length=8, start=0, end=4) as session:
        steps = [session.step(hidden[:, :4]), session.step(hidden[:, 4:5])]
        os.kill(node.status["actors"]["runtime.0"]["pid"], signal.SIGKILL)
        steps += [session.step(hidden[:, t : t + 1]) for t in range(5, 8)]
    client.swarm.active_adapter = None
    assert rel_err(torch.cat(steps, 1), reference(model, hidden, 0, 4)) <= TOL
    assert any(e.get("event") == "session recovered" for e in node.log_events())
    wait_until(lambda: node.status.get("state") == "online" and client.spans(4), 60, "the node ONLINE again", node)


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
    with NodeProcess(
        MICRO_LLAMA, tmp_path / "lora-int8", "--quant_type", "int8", "--adapters", name, dht_prefix="micro-lora8"
    ) as node:
        with Client(node.maddrs, "micro-lora8") as client:
            client.swarm.active_adapter = name
            torch.manual_seed(9)
            hidden = torch.randn(1, 5, 64)
            out = client.forward(hidden, 0, 4)
    expected = reference(model, hidden, 0, 4)
    assert rel_err(out - hidden, expected - hidden) <= 0.05  # the int8 bound of tests/helpers/quantization.py


def test_node_measures_adapter_memory(node, adapters):
    """The runtime tries the adapters on an empty block 0 before joining; what they add to it counts in
    the memory of each block (PROTOCOL 5.3)."""
    events = [json.loads(line) for line in node.log_path.read_text().splitlines() if line.startswith("{")]
    (measured,) = [e for e in events if e.get("event") == "device measured"]
    expected = sum(
        p.numel()
        for model in adapters.values()
        for n, p in model.named_parameters()
        if "lora_" in n and ".layers.0." in n
    )
    assert measured["adapter_bytes"] == expected * 4 > 0


# --- blocks of every family against peft, without a node ------------------------------------------


def test_a_node_with_a_wrong_adapter_stops_before_joining(tmp_path):
    (tmp_path / "not-an-adapter").mkdir()
    node = NodeProcess(
        MICRO_LLAMA, tmp_path / "bad", "--adapters", str(tmp_path / "not-an-adapter"), dht_prefix="micro-badlora"
    )
    node.launch()
    try:
        assert node.proc.wait(60) != 0
    finally:
        node.stop()
    log = node.log_path.read_text()
    assert "has no adapter_config.json" in log and '"state": "JOINING"' not in log


# --- tensor parallelism: each rank holds its share of the LoRA weights -------------------------------


def test_tensor_parallel_node_with_adapters_equals_peft(tmp_path, adapters, micro_hf):
    with NodeProcess(
        MICRO_LLAMA,
        tmp_path / "lora-tp",
        "--tensor_parallel_devices",
        "cpu",
        "cpu",
        "--adapters",
        *adapters,
        dht_prefix="micro-lora-tp",
    ) as node:
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
