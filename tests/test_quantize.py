"""Quantization with bitsandbytes (PROTOCOL 5.4, 5.5): every Linear replaced, outputs near the
unquantized block, memory as the size formula says, and a clean fallback where it cannot run.

Bounds (float32 blocks of random weights, error of the block's update `out - input` relative to
the unquantized one): int8 within 5% (row-wise 8-bit weights, outliers above 6.0 kept exact), nf4
within 25% (4-bit normal-float weights in blocks of 64). The published memory formula counts
parameters x bytes per value x 1.01; the real blocks, statistics included, are within 5% of it.

Generation through a quantized node (micro-llama, 4 blocks, greedy): every served token is the greedy
choice of the same quantized blocks run here (serving adds no error of its own), and the logits of the
quantized model are within LOGIT_BOUND of the unquantized one's (largest difference relative to the
largest logit; measured 2% for int8, 30% for nf4). The micro model's random weights leave the top two
logits as little as 0.02 apart, so only int8 is held to transformers' own greedy tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

from node.runtime.capacity import block_params, random_block
from node.weights.checkpoint import Checkpoint
from node.client.swarm import Client
from node.client.generate import LocalHead, greedy_generate
from node.tools.launcher import NodeProcess
from node.runtime.models import get_family
from node.runtime.quantize import QuantizationUnavailable, block_memory, check_quantization, quantize_block
from node.supervisor.resources import block_size_bytes
from tests.conftest import MICRO_LLAMA, hf_blocks, rel_err

BOUND = {"int8": 0.05, "nf4": 0.25}
LOGIT_BOUND = {"int8": 0.05, "nf4": 0.4}


def plain_linears(block: nn.Module) -> list:
    import bitsandbytes as bnb

    return [m for m in block.modules() if isinstance(m, nn.Linear) and not isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]


@pytest.fixture(scope="module")
def config():
    return LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=1)


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_quantized_block_is_close_and_sized_as_the_formula(config, quant_type):
    block_class = get_family(config).block_class
    plain = random_block(block_class, config, torch.float32, "cpu")
    quantized = quantize_block(copy.deepcopy(plain), quant_type, torch.float32)
    assert not plain_linears(quantized), "every nn.Linear is replaced"
    formula = block_size_bytes(block_params(block_class, config), "float32", quant_type)
    assert abs(block_memory(quantized) / formula - 1) <= 0.05
    torch.manual_seed(0)
    x = torch.randn(2, 7, 256)
    with torch.inference_mode():
        expected, got = plain(x), quantized(x)
    assert rel_err(got - x, expected - x) <= BOUND[quant_type]


def test_unavailable_quantization_is_reported(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if bitsandbytes could not load
    with pytest.raises(QuantizationUnavailable, match="nf4"):
        check_quantization("nf4", torch.float32, "cpu")
    check_quantization("none", torch.float32, "cpu")


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_quantized_node_serves_close_outputs_and_publishes_its_quant_type(tmp_path, micro_hf, quant_type):
    prefix = f"micro-{quant_type}"
    with NodeProcess(MICRO_LLAMA, tmp_path / quant_type, "--quant_type", quant_type, dht_prefix=prefix) as node:
        with Client(node.maddrs, prefix) as client:
            assert client.spans(4)[0].info.quant_type == quant_type
            torch.manual_seed(3)
            hidden = torch.randn(1, 6, 64)
            out = client.forward(hidden, 0, 4)
            expected = hf_blocks(micro_hf, hidden, 0, 4)
            assert rel_err(out - hidden, expected - hidden) <= BOUND[quant_type]
            with client.session(max_length=8, start=0, end=4) as session:
                steps = [session.step(hidden[:, :4]), session.step(hidden[:, 4:5]), session.step(hidden[:, 5:6])]
            assert rel_err(torch.cat(steps, 1), out) <= 1e-4  # incremental = forward, quantized or not
            head = LocalHead(str(MICRO_LLAMA))
            prompt = torch.tensor([[1, 17, 42, 99, 3]])
            served = greedy_generate(client, head, prompt, max_new_tokens=6)
    checkpoint = Checkpoint.open(str(MICRO_LLAMA))
    family = get_family(checkpoint.config())
    with torch.inference_mode():
        hidden = head.embed(served)
        for i in range(4):
            state = checkpoint.block_state(f"{family.block_prefix}.{i}.", dtype=torch.float32)
            block = family.block_class.from_state(checkpoint.config(), state, dtype=torch.float32, device="cpu")
            hidden = quantize_block(block, quant_type, torch.float32)(hidden)
        logits = head.logits(hidden)[0, prompt.shape[1] - 1 : -1]
        expected = micro_hf(served).logits[0, prompt.shape[1] - 1 : -1]
    chosen = logits.gather(-1, served[0, prompt.shape[1] :, None])[:, 0]
    assert (chosen >= logits.max(-1).values - 1e-3).all(), "each served token is the quantized model's greedy choice"
    assert rel_err(logits, expected) <= LOGIT_BOUND[quant_type]
    if quant_type == "int8":
        reference = micro_hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert served.tolist() == reference.tolist()


def test_node_falls_back_when_the_device_cannot_quantize(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "bitsandbytes.py").write_text("raise ImportError('bitsandbytes disabled for this test')\n")
    env = {"PYTHONPATH": str(blocker)}
    node = NodeProcess(MICRO_LLAMA, tmp_path / "fallback", "--quant_type", "nf4", dht_prefix="micro-fallback", env=env)
    with node:
        with Client(node.maddrs, "micro-fallback") as client:
            assert client.spans(4)[0].info.quant_type == "none"
        assert "quantization unavailable; serving unquantized" in node.log_path.read_text()


@pytest.mark.parametrize("family", ["bloom", "falcon", "mixtral"])
@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_every_family_quantizes(family, quant_type):
    from transformers import AutoConfig

    from tests.conftest import SHARED

    config = AutoConfig.from_pretrained(str(SHARED / "models" / f"micro-{family}"))
    block_class = get_family(config).block_class
    plain = random_block(block_class, config, torch.float32, "cpu")
    quantized = quantize_block(copy.deepcopy(plain), quant_type, torch.float32)
    assert not plain_linears(quantized)
    torch.manual_seed(0)
    x = torch.randn(1, 5, config.hidden_size)
    with torch.inference_mode():
        expected, got = plain(x), quantized(x)
    assert torch.isfinite(got).all() and rel_err(got - x, expected - x) <= BOUND[quant_type] * 2
