"""Shared fixtures: tiny models made here with a fixed seed, and whole nodes started as a user would.

A node is started with `python -m node.supervisor ...` on loopback in a private swarm; `NodeProcess`
waits until RUN_DIR/status.json says ONLINE and always stops what it started.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.tools.launcher import NodeProcess  # noqa: F401  (tests start their own nodes with it)

ROOT = Path(__file__).resolve().parent.parent
# A copy of ../shared (the micro models and the recorded Petals traffic) lives in tests/data so that a
# clean clone tests itself; NODE_SHARED_DIR points the tests at another copy.
SHARED = Path(os.environ.get("NODE_SHARED_DIR", ROOT / "tests" / "data"))
MICRO_LLAMA = SHARED / "models" / "micro-llama"
VECTORS = SHARED / "vectors"


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from node.tools.tinymodel import make_tiny_llama

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny_llama(str(path), hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=128, seed=0)
    return path


@pytest.fixture(scope="session")
def micro_node(tmp_path_factory):
    """A node serving all 4 blocks of micro-llama, shared by tests that do not disturb it."""
    node = NodeProcess(MICRO_LLAMA, tmp_path_factory.mktemp("nodes") / "micro", "--num_handlers", "2")
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def micro_client(micro_node):
    from node.client.swarm import Client

    client = Client(micro_node.maddrs, "micro-llama")
    yield client
    client.close()


@pytest.fixture(scope="session")
def micro_hf():
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MICRO_LLAMA), dtype=torch.float32)
    return model.eval()


def hf_layers(model):
    """The decoder layers of a transformers causal LM, whatever the family calls them."""
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


def hf_blocks(model, hidden, start: int, end: int, prompts=None):
    """Reference: transformers' layers [start, end) applied to `hidden` (deep prompts added before each)."""
    import torch

    captured = {}
    hooks = []
    layers = hf_layers(model)

    def replace_input(module, args, kwargs):
        return (hidden,) + tuple(args[1:]), kwargs

    def add_prompt(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            p = prompts[i - start]
            h = torch.cat([h[:, : p.shape[-2]] + p, h[:, p.shape[-2] :]], dim=1)
            if args:
                return (h,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs

        return hook

    hooks.append(layers[start].register_forward_pre_hook(replace_input, with_kwargs=True))
    if prompts is not None:
        for i in range(start, end):
            hooks.append(layers[i].register_forward_pre_hook(add_prompt(i), with_kwargs=True))
    hooks.append(layers[end - 1].register_forward_hook(lambda m, a, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out)))
    try:
        model(inputs_embeds=torch.zeros_like(hidden), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured["out"]


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _gloo_rank(rank: int, world: int, store: str, fn, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        try:
            out = fn(rank, world, *args)
        except Exception as e:  # reported, not hung: the other rank fails the same way
            out = repr(e)
        if rank == 0:
            results.put(out)
    finally:
        dist.destroy_process_group()


def on_two_gloo_ranks(fn, store: str, *args, timeout: float = 240.0):
    """`fn(rank, 2, *args)` in two spawned processes joined in a gloo group (tensor parallelism on the
    CPU); rank 0's result, or the repr of its exception. `fn` must be importable (module level); both
    processes are gone when this returns."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(rank, 2, store, fn, args, results)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        return results.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
