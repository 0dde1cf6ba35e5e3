"""Quantized nodes (PROTOCOL 5.4, 5.5): they serve close outputs, publish their quant_type, and fall back
to unquantized blocks where the device cannot quantize.

Generation through a quantized node (micro-llama, 4 blocks, greedy): every served token is the greedy
choice of the same quantized blocks run here (serving adds no error of its own), and the logits of the
quantized model are within LOGIT_BOUND of the unquantized one's (largest difference relative to the
largest logit; measured 2% for int8, 30% for nf4). The micro model's random weights leave the top two
logits as little as 0.02 apart, so only int8 is held to transformers' own greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from node.client.generate import LocalHead, greedy_generate
from node.client.swarm import Client
from node.runtime.models import get_family
from node.runtime.quantize import quantize_block
from node.tools.launcher import NodeProcess
from node.weights.checkpoint import Checkpoint
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.quantization import BOUND
from tests.helpers.reference import hf_blocks, rel_err

LOGIT_BOUND = {"int8": 0.05, "nf4": 0.4}


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
        reference = micro_hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
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
