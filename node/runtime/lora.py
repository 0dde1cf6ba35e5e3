"""LoRA adapters (PROTOCOL 5.12): loaded into the blocks once, chosen per request.

An adapter is a hub repository or a local directory with `adapter_config.json` (peft, LORA, no bias
training, no DoRA) and `adapter_model.safetensors`. Hub files come through node/weights/store.py (the
model's cache directory, its locking, retries and --max_disk_space). Every Linear of a block for which
the adapter holds weights and which its `target_modules` (and `layers_to_transform`) select is wrapped
in a LoraLinear that adds `scaling * B(A(x))` for the adapter active in the current computation;
scaling is lora_alpha / r (sqrt(r) with use_rslora), per module with `rank_pattern`/`alpha_pattern`.

peft names weights after the module in the transformers causal LM (`base_model.model.model.layers.3.
self_attn.q_proj.lora_A.weight`, `...transformer.h.3.self_attention.query_key_value...`), which need not
start with the block prefix of the checkpoint (BLOOM's bare `h.3.`): a key belongs to block N when its
module name has `<last part of the prefix>.N.` in it. Weights for a module the block does not have are
an error, never silently dropped.

The runtime activates one adapter (or none) around each batch of work and never mixes work of
different adapters in one batch, so a batch computes exactly what its requests would compute alone.
Adapters are published under the names they were given on the command line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from node.runtime.tensor_parallel import shard

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_A\.weight$")


class AdapterError(ValueError):
    pass


@dataclass
class Adapter:
    name: str
    rank: int
    alpha: float
    targets: object  # list of module names, or a regex string over full module names
    path: str  # the weights file
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)  # module name pattern -> r
    alpha_pattern: dict = field(default_factory=dict)  # module name pattern -> lora_alpha
    layers: Optional[set] = None  # layers_to_transform; None: every layer
    cache: object = None  # the WeightStore a hub file lives in; None for a local directory
    source: tuple = ()  # (repo_id, filename) of a hub file, to fetch it again if it was evicted

    def targets_module(self, full_name: str, index: int) -> bool:
        if self.layers is not None and index not in self.layers:
            return False
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, full_name) is not None
        return any(full_name == t or full_name.endswith(f".{t}") for t in self.targets)

    def scaling(self, full_name: str) -> float:
        rank = _pattern(self.rank_pattern, full_name, self.rank)
        alpha = _pattern(self.alpha_pattern, full_name, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def expected_rank(self, full_name: str) -> int:
        return int(_pattern(self.rank_pattern, full_name, self.rank))

    @contextlib.contextmanager
    def weights(self) -> Iterator:
        """The safetensors file, open; a hub file is read under the cache's shared lock, so that no
        node evicts it meanwhile."""
        from safetensors import safe_open

        if self.cache is None:
            with safe_open(self.path, framework="pt") as f:
                yield f
            return
        for _ in range(3):
            with self.cache.reading():
                if os.path.exists(self.path):
                    with safe_open(self.path, framework="pt") as f:
                        yield f
                    return
            self.path = self.cache.fetch(*self.source)  # evicted since: fetch again (not under the shared lock)
        raise AdapterError(f"adapter {self.name}: {WEIGHTS_FILE} keeps being evicted from {self.cache.cache_dir}")

    def modules(self, keys, block_prefix: str) -> dict:
        """{(block index, module path inside the block): (full module name, key stem)} of the LoRA
        weights in `keys`. Weights outside the blocks (an lm_head's) are not a server's business."""
        last = re.escape(block_prefix.rsplit(".", 1)[-1])
        where = re.compile(rf"^(?:.*?\.)?{last}\.(\d+)\.(.+)$")
        found = {}
        for key in keys:
            m = _KEY.match(key)
            place = where.match(m["name"]) if m else None
            if place is not None:
                found[(int(place[1]), place[2])] = (m["name"], key[: -len(".lora_A.weight")])
        return found


def _pattern(patterns: dict, full_name: str, default):
    """peft's rule: the first pattern that matches the end of the module's name, after a dot."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", full_name):
            return value
    return default


def _file(name: str, filename: str, cache) -> str:
    missing = AdapterError(f"argument --adapters: {name} has no {filename}")
    if os.path.isdir(name):
        path = os.path.join(name, filename)
        if not os.path.exists(path):
            raise missing
        return path
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return cache.fetch(name, filename)
    except EntryNotFoundError:
        raise missing from None
    except OSError as e:  # node.weights.store explains: no such repository, a refused token, no network, no disk
        raise AdapterError(f"argument --adapters: cannot get {filename} of {name}: {e}") from None


def load_adapter(
    name: str, *, cache_dir=None, token=None, max_disk_space=None, download_attempts=None, weight_store=None
) -> Adapter:
    """Read an adapter's config (fetching its files if it is on the hub); AdapterError says what is wrong."""
    cache = None
    if not os.path.isdir(name):
        if weight_store is None:
            from node.weights import default_cache_dir
            from node.weights.store import DEFAULT_ATTEMPTS, WeightStore

            weight_store = WeightStore(
                cache_dir or default_cache_dir(),
                max_disk_space=max_disk_space,
                attempts=download_attempts or DEFAULT_ATTEMPTS,
            )
        cache = _TokenCache(weight_store, token)
    try:
        with open(_file(name, CONFIG_FILE, cache)) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"argument --adapters: {name}: unreadable {CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"argument --adapters: {name}: {CONFIG_FILE} is not an object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"argument --adapters: {name} is a {config.get('peft_type')} adapter; only LORA is served")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"argument --adapters: {name} trains biases, which is not supported")
    for option in ("use_dora", "fan_in_fan_out"):
        if config.get(option):
            raise AdapterError(f"argument --adapters: {name} uses {option}, which is not supported")
    try:
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
        layers = config.get("layers_to_transform")
        layers = None if layers is None else {int(layers)} if isinstance(layers, int) else {int(i) for i in layers}
        if rank < 1:
            raise ValueError("r must be positive")
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"argument --adapters: {name}: bad {CONFIG_FILE} ({type(e).__name__}: {e})") from None
    targets = config.get("target_modules") or []
    path = _file(name, WEIGHTS_FILE, cache)
    return Adapter(
        name,
        rank,
        alpha,
        targets,
        path,
        use_rslora=bool(config.get("use_rslora")),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        layers=layers,
        cache=cache,
        source=(name, WEIGHTS_FILE),
    )


class _TokenCache:
    """A WeightStore that always passes the node's token (Adapter.weights fetches again without one)."""

    def __init__(self, cache, token):
        self._cache, self._token = cache, token
        self.cache_dir = cache.cache_dir

    def fetch(self, repo_id: str, filename: str) -> str:
        return self._cache.fetch(repo_id, filename, token=self._token)

    def reading(self):
        return self._cache.reading()


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
    # ParameterDict keys cannot hold dots; "_" doubled first, so that "a.b" and "a_b" stay apart
    return name.replace("_", "__").replace(".", "_d") if name else ""


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
    linears = {}  # path inside the whole block -> (parent module, attribute)
    for parent_name, parent in block.named_modules():
        if isinstance(parent, LoraLinear):
            continue  # its base layer is reached through it
        for child_name, child in parent.named_children():
            if isinstance(child, (nn.Linear, LoraLinear)) or hasattr(child, "in_features"):  # bitsandbytes layers too
                path = f"{parent_name}.{child_name}" if parent_name else child_name
                # a tensor-parallel shard wraps layers (node/runtime/tensor_parallel/shard.py): name them as in the
                # whole block
                path = ".".join(part for part in path.split(".") if part != shard.WRAPPER_ATTRIBUTE)
                linears[path] = (parent, child_name)
    added = 0
    for adapter in adapters:
        with adapter.weights() as weights:
            mine = {
                path: found for (i, path), found in adapter.modules(weights.keys(), block_prefix).items() if i == index
            }
            unknown = sorted(set(mine) - set(linears))
            if unknown:
                raise AdapterError(
                    f"adapter {adapter.name} has LoRA weights for {mine[unknown[0]][0]}, "
                    f"which is not a Linear of this node's block {index}"
                )
            for path, (parent, attribute) in linears.items():
                full, stem = mine.get(path, (f"{block_prefix}.{index}.{path}", None))
                try:
                    targeted = adapter.targets_module(full, index)
                    scaling, rank = adapter.scaling(full), adapter.expected_rank(full)
                except re.error as e:
                    raise AdapterError(f"adapter {adapter.name}: bad pattern in its config: {e}") from None
                if not targeted:
                    continue  # peft would not have made LoRA layers for it
                if stem is None:
                    raise AdapterError(f"adapter {adapter.name} targets {full} but has no LoRA weights for it")
                a = weights.get_tensor(f"{stem}.lora_A.weight")
                try:
                    b = weights.get_tensor(f"{stem}.lora_B.weight")
                except Exception:
                    raise AdapterError(f"adapter {adapter.name} has lora_A but no lora_B weights for {full}") from None
                child = getattr(parent, attribute)
                # on a tensor-parallel rank the layer holds some output rows (B's rows) or input columns (A's)
                rows, cols, (out_features, in_features) = shard.slice_of(
                    child.base if isinstance(child, LoraLinear) else child
                )
                if a.shape != (rank, in_features) or b.shape != (out_features, rank):
                    raise AdapterError(
                        f"adapter {adapter.name}: {full} has LoRA shapes {list(a.shape)}, {list(b.shape)}; "
                        f"expected [{rank}, {in_features}], [{out_features}, {rank}]"
                    )
                a = a if cols is None else a[:, cols].contiguous().clone()
                b = b if rows is None else b[rows].contiguous().clone()
                a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
                if not isinstance(child, LoraLinear):
                    child = LoraLinear(child)
                    setattr(parent, attribute, child)
                child.add(_key(adapter.name), a, b, scaling)
                added += a.numel() + b.numel()
    if added:
        block.compute_dtype = dtype
        if getattr(block, "slow_tp", 1) != 1:
            block.slow_tp = 1  # the sliced matmuls bypass the wrapped layers
    return added
