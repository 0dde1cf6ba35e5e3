"""LoRA adapters made here with peft (fixed seeds), their reference outputs, and our blocks loaded with them."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch

from node.runtime import lora
from node.runtime.models import get_family
from node.weights.checkpoint import Checkpoint
from tests.helpers.paths import SHARED
from tests.helpers.reference import hf_blocks

peft = pytest.importorskip("peft")


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


def reference(model, hidden, start, end):
    with torch.no_grad():
        return hf_blocks(model.base_model.model, hidden, start, end)


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


def write_adapter(path, config: dict, tensors: dict) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / lora.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config}))
    safetensors.torch.save_file(tensors, str(path / lora.WEIGHTS_FILE))
    return str(path)


# targets of each family's modules, attention and MLP (Mixtral: the experts)
FAMILY_TARGETS = {
    "micro-llama": ["k_proj", "o_proj", "up_proj"],
    "micro-bloom": [
        "query_key_value",
        "dense_4h_to_h",
    ],  # BLOOM's checkpoint is bare (h.N.), peft's keys transformer.h.N.
    "micro-falcon": ["query_key_value", "dense", "dense_h_to_4h"],
    "micro-mixtral": ["v_proj", "w1", "w2"],
}
