"""LoRA adapters (PROTOCOL 5.12): loaded into the blocks once, chosen per request.

An adapter is a hub repository or a local directory with `adapter_config.json` (peft, LORA, no bias
training) and `adapter_model.safetensors`. Every Linear of a block whose name matches the adapter's
`target_modules` is wrapped in a LoraLinear that adds `scaling * B(A(x))` for the adapter active in
the current computation. The runtime activates one adapter (or none) around each batch of work and
never mixes work of different adapters in one batch, so a batch computes exactly what its requests
would compute alone. Adapters are published under the names they were given on the command line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(ValueError):
    pass


@dataclass
class Adapter:
    name: str
    rank: int
    scaling: float
    targets: object  # list of module names, or a regex string over full module names
    path: str  # the weights file

    def targets_module(self, full_name: str) -> bool:
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, full_name) is not None
        return any(full_name == t or full_name.endswith(f".{t}") for t in self.targets)


def _file(name: str, filename: str, *, cache_dir=None, token=None) -> str:
    if os.path.isdir(name):
        path = os.path.join(name, filename)
        if not os.path.exists(path):
            raise AdapterError(f"argument --adapters: {name} has no {filename}")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(name, filename, cache_dir=cache_dir, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError) as e:
        raise AdapterError(f"argument --adapters: {name} has no {filename} ({type(e).__name__})") from None


def load_adapter(name: str, *, cache_dir=None, token=None) -> Adapter:
    with open(_file(name, CONFIG_FILE, cache_dir=cache_dir, token=token)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"argument --adapters: {name} is a {config.get('peft_type')} adapter; only LORA is served")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"argument --adapters: {name} trains biases (bias={config['bias']!r}), which is not supported")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    targets = config.get("target_modules") or []
    return Adapter(name, rank, scaling, targets, _file(name, WEIGHTS_FILE, cache_dir=cache_dir, token=token))


class LoraLinear(nn.Module):
    """A Linear (plain or quantized) plus the low-rank updates of the adapters that target it."""

    active: str = ""  # the adapter of the computation under way, set by `activate`

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    # the block code reads these from its layers
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def add(self, key: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        self.lora_a[key] = nn.Parameter(a, requires_grad=False)
        self.lora_b[key] = nn.Parameter(b, requires_grad=False)
        self.scaling[key] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        key = _key(LoraLinear.active)
        if key in self.lora_a:
            a, b = self.lora_a[key], self.lora_b[key]
            out = out + (x.to(a.dtype) @ a.T @ b.T * self.scaling[key]).to(out.dtype)
        return out


def _key(name: str) -> str:
    return name.replace(".", "_").replace("/", "__") if name else ""  # ParameterDict keys cannot hold dots


@contextlib.contextmanager
def activate(name: str):
    previous, LoraLinear.active = LoraLinear.active, name or ""
    try:
        yield
    finally:
        LoraLinear.active = previous


def attach(block: nn.Module, index: int, block_prefix: str, adapters: list[Adapter], dtype: torch.dtype, device) -> int:
    """Wrap the targeted Linears of block `index` and load each adapter's weights for them; returns
    how many LoRA parameters were added (PROTOCOL 5.3 counts them in a block's memory)."""
    from safetensors import safe_open

    added = 0
    for adapter in adapters:
        with safe_open(adapter.path, framework="pt") as weights:
            keys = set(weights.keys())
            for parent_name, parent in list(block.named_modules()):
                if isinstance(parent, LoraLinear):
                    continue  # its base layer is reached through it
                for child_name, child in list(parent.named_children()):
                    path = f"{parent_name}.{child_name}" if parent_name else child_name
                    full = f"{block_prefix}.{index}.{path}"
                    if not adapter.targets_module(full):
                        continue
                    if not isinstance(child, (nn.Linear, LoraLinear)) and not hasattr(child, "in_features"):
                        continue
                    stem = f"base_model.model.{full}"
                    a_key, b_key = f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
                    if a_key not in keys or b_key not in keys:
                        raise AdapterError(f"adapter {adapter.name} targets {full} but has no {a_key} / {b_key}")
                    a = weights.get_tensor(a_key).to(device=device, dtype=dtype)
                    b = weights.get_tensor(b_key).to(device=device, dtype=dtype)
                    if not isinstance(child, LoraLinear):
                        child = LoraLinear(child)
                        setattr(parent, child_name, child)
                    if a.shape != (adapter.rank, child.in_features) or b.shape != (child.out_features, adapter.rank):
                        raise AdapterError(f"adapter {adapter.name}: {full} has LoRA shapes {list(a.shape)}, {list(b.shape)}")
                    child.add(_key(adapter.name), a, b, adapter.scaling)
                    added += a.numel() + b.numel()
    if added:
        block.compute_dtype = dtype
        if getattr(block, "slow_tp", 1) != 1:
            block.slow_tp = 1  # the sliced matmuls bypass the wrapped layers
    return added
