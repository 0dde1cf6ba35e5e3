"""What this runtime's device can do, measured before any of the node's blocks load.

Runs in the runtime (it has torch and the device): the parameters of one block of the model's real
architecture, the device's memory, and the block's speed (node/runtime/throughput.py, cached per host). The
supervisor decides from these how many blocks to serve and what throughput to announce.
"""

from __future__ import annotations

import torch

from node.runtime import throughput
from protocol.frames import DTYPES
from protocol.messages import Measured
from protocol.plan import NodePlan


def block_params(block_class, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in block_class(config).parameters())


def random_block(block_class, config, dtype: torch.dtype, device) -> torch.nn.Module:
    """A block of the real architecture with random weights (timing does not depend on their values)."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in block_class(config).state_dict().items()}
    if torch.device(device).type == "cpu":
        generator = torch.Generator().manual_seed(0)
        state = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    else:  # made on the device in its dtype: in float32 on the host, one 405B block would take about 13 GB
        generator = torch.Generator(device=device).manual_seed(0)
        state = {
            name: torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02, generator=generator)
            for name, shape in shapes.items()
        }
    return block_class.from_state(config, state, dtype=dtype, device=device)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, available now) bytes of the device; a CPU's are the host's RAM. On a GPU, what PyTorch's
    caching allocator holds without using it is available to this process too (mem_get_info counts it as
    taken: a runtime that freed a cache would otherwise never find room to load before it switches)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return total, free + max(0, cached)
    import psutil

    from node.weights import mapped

    ram = psutil.virtual_memory()
    # The kernel counts the checkpoint pages our blocks are served from as reclaimable, hence available.
    return ram.total, max(0, ram.available - mapped.resident_bytes())


def group_memory(plan: NodePlan, log=None) -> tuple[int, int]:
    """(total, available) of a tensor-parallel group (PROTOCOL 5.3): on GPUs the smallest device times
    their number, refused when they differ by more than 1.5x (the smallest would run out first while
    the others idle); on CPUs the ranks share the host's RAM, counted once."""
    devices = [torch.device(d) for d in plan.tensor_parallel_devices]
    if devices[0].type != "cuda":
        return device_memory(devices[0])
    # Only rank 0's own device is asked what is free: mem_get_info on another GPU would create a CUDA context
    # there (hundreds of MB that a neighbouring process would count as its own); its total needs none.
    own = device_memory(devices[0])
    memories = [own] + [
        (torch.cuda.get_device_properties(d).total_memory,) * 2 for d in dict.fromkeys(devices) if d != devices[0]
    ]
    totals = [m[0] for m in memories]
    if max(totals) > 1.5 * min(totals):
        message = (
            "the devices of --tensor_parallel_devices differ in memory "
            f"({', '.join(f'{t / 2**30:.1f}' for t in totals)} GiB); "
            "the smallest limits every shard"
        )
        if log is not None:
            log.warning(message)
        if plan.wanted_blocks is None and plan.choose_blocks:
            raise ValueError(message + ": set --num_blocks")
    return min(totals) * len(memories), min(m[1] for m in memories) * len(memories)  # a device named twice counts once


def measure(plan: NodePlan, block_class, config, prepare=lambda block: block, log=None) -> Measured:
    """Everything the supervisor needs before choosing blocks. `prepare` turns a freshly built block
    into what the node will serve (quantization), so that its speed is measured as served."""
    device = torch.device(plan.device)
    dtype = DTYPES[plan.torch_dtype]
    total, available = group_memory(plan, log) if plan.tp_world > 1 else device_memory(device)
    n_params = block_params(block_class, config)
    report = Measured(
        device_type=device.type,
        device_memory=total,
        available_memory=available,
        block_params=n_params,
        quant_type=plan.quant_type,
        num_devices=plan.tp_world,
    )
    if plan.throughput_mode in ("auto", "eval", "dry_run"):
        # With tensor parallelism the key names every device (PROTOCOL 5.2); the block is still timed
        # whole on the first device: a bound for what the group does, without forming it first.
        key = throughput.cache_key(plan.model, device, plan.torch_dtype, plan.quant_type, plan.tensor_parallel_devices)

        def run() -> dict:
            block = prepare(random_block(block_class, config, dtype, device))
            return throughput.measure_compute(block, plan.hidden_size, dtype, device)

        bandwidth = plan.network_bandwidth * 1e6 if plan.network_bandwidth else None
        info = throughput.get_throughput_info(
            plan.cache_dir, key, run, plan.hidden_size, bandwidth, force=plan.throughput_mode != "auto", log=log
        )
        report.inference_rps = float(info["inference_rps"])
        report.forward_rps = float(info["forward_rps"])
        report.network_rps = float(info["network_rps"])
    return report
