"""A node's plan resolved in-process, as the supervisor resolves it, for tests that drive an actor's core
(node/runtime/engine.py, node/allocator/admission.py) without its process."""

from __future__ import annotations

from protocol.plan import NodePlan
from tests.helpers.paths import MICRO_LLAMA


def micro_plan(run_dir: str, *flags: str) -> NodePlan:
    """The micro Llama's plan on the CPU in float32, blocks 0:4 unless `flags` say otherwise."""
    from node.startup import transformers_without_torch
    from node.supervisor.config import parse_config
    from node.supervisor.resolve import resolve_plan

    transformers_without_torch()
    base = ["--model", str(MICRO_LLAMA), "--dht_prefix", "micro", "--block_indices", "0:4", "--new_swarm"]
    base += ["--device", "cpu", "--torch_dtype", "float32", "--quant_type", "none"]
    return resolve_plan(parse_config(base + list(flags)), run_dir, None)
