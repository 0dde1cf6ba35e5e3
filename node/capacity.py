"""What this runtime's device can do, measured before any of the node's blocks load.

Runs in the runtime (it has torch and the device): the parameters of one block of the model's real
architecture, the device's memory, and the block's speed (node/throughput.py, cached per host). The
supervisor decides from these how many blocks to serve and what throughput to announce.
"""

from __future__ import annotations

import torch

from node import throughput
from node.resources import block_size_bytes
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
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    return block_class.from_state(config, state, dtype=dtype, device=device)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, available now) bytes of the device; a CPU's are the host's RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    import psutil

    ram = psutil.virtual_memory()
    return ram.total, ram.available


def measure(plan: NodePlan, block_class, config, prepare=lambda block: block, log=None) -> Measured:
    """Everything the supervisor needs before choosing blocks. `prepare` turns a freshly built block
    into what the node will serve (quantization), so that its speed is measured as served."""
    device = torch.device(plan.device)
    dtype = DTYPES[plan.torch_dtype]
    total, available = device_memory(device)
    n_params = block_params(block_class, config)
    report = Measured(
        device_type=device.type,
        device_memory=total,
        available_memory=available,
        block_params=n_params,
        block_bytes=block_size_bytes(n_params, plan.torch_dtype, plan.quant_type),
        quant_type=plan.quant_type,
    )
    if plan.throughput_mode in ("auto", "eval", "dry_run"):
        key = throughput.cache_key(plan.model, device, plan.torch_dtype, plan.quant_type)

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
