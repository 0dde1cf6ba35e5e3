"""Quantization with bitsandbytes (PROTOCOL 5.4, 5.5), on blocks: every Linear replaced, outputs near the
unquantized block, memory as the size formula says, and a clean report where it cannot run.

Bounds (float32 blocks of random weights, error of the block's update `out - input` relative to
the unquantized one): int8 within 5% (row-wise 8-bit weights, outliers above 6.0 kept exact), nf4
within 25% (4-bit normal-float weights in blocks of 64). The published memory formula counts
parameters x bytes per value x 1.01; the real blocks, statistics included, are within 5% of it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig

from node.runtime.capacity import block_params, random_block
from node.runtime.models import get_family
from node.runtime.quantize import QuantizationUnavailable, block_memory, check_quantization, quantize_block
from node.supervisor.resources import block_size_bytes
from tests.helpers.quantization import BOUND, plain_linears
from tests.helpers.reference import rel_err


@pytest.fixture(scope="module")
def config():
    return LlamaConfig(
        hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=1
    )


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


@pytest.mark.parametrize("family", ["bloom", "falcon", "mixtral"])
@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_every_family_quantizes(family, quant_type):
    from transformers import AutoConfig

    from tests.helpers.paths import SHARED

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
