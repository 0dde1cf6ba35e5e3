"""How many blocks fit on this node (PROTOCOL 5.3, 5.4, 5.7): pure arithmetic, no torch.

The runtime reports what only it can know (the parameters of one block of the real architecture,
the device's memory); the supervisor decides here, before any block loads, and logs the numbers.
Petals refuses to choose on a CPU; the node chooses from the RAM that is available, keeping a margin
for everything else on the host.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from protocol.wire import ITEMSIZE as DTYPE_BYTES  # bytes per value of each dtype: the one table

QUANT_BYTES = {"int8": 1.0, "nf4": 4.25 / 8}
GiB = 1024**3


def block_size_bytes(n_params: int, dtype: str, quant_type: str = "none") -> int:
    """Memory of one block's weights: parameters x bytes per value, plus 1% for what rides along."""
    per_value = QUANT_BYTES.get(quant_type, DTYPE_BYTES[dtype])
    return round(n_params * per_value * 1.01)


# What a GPU holds besides blocks, caches and activations: the CUDA context and cuBLAS workspaces (and NCCL's
# buffers in a group), about 1 GiB a device, and what the caching allocator cannot reuse between caches of
# varying sizes and activations (fragmentation), kept as a share of the device.
GPU_FIXED_BYTES = GiB
GPU_FRAGMENTATION = 0.03


def gpu_reserve_bytes(device_memory: int, num_devices: int = 1) -> int:
    """Memory of a GPU node that no block may count on (device_memory is the group's, all devices)."""
    return GPU_FIXED_BYTES * num_devices + int(device_memory * GPU_FRAGMENTATION)


def autograd_bytes(hidden_size: int, num_devices: int = 1) -> int:
    """What Petals keeps free for backward passes: 2 GiB per device for a 14336-wide model, in proportion."""
    return int(2 * GiB * num_devices * hidden_size / 14336)


@dataclass
class Estimate:
    num_blocks: int
    memory: int  # bytes the choice is made from
    autograd: int
    block: int
    cache: int
    reserve: int  # on a GPU: context, workspaces, fragmentation (gpu_reserve_bytes)
    adapters: int
    history: int  # per block; in host memory, so counted here only when the blocks are in RAM too
    source: str  # "gpu" or "ram"

    def fields(self) -> dict:
        return asdict(self)


class NotEnoughMemory(ValueError):
    pass


def estimate_num_blocks(
    *,
    device_type: str,
    device_memory: int,
    available_memory: int,
    block_bytes: int,
    cache_bytes: int,
    adapter_bytes: int = 0,
    history_bytes: int = 0,
    history_fixed: int = 0,
    hidden_size: int,
    total_blocks: int,
    num_devices: int = 1,
    margin: float = 0.2,
) -> Estimate:
    """How many blocks (with their cache and adapters) fit next to the autograd reserve.

    On a GPU the node has the device to itself, as in Petals: its total memory counts (for tensor
    parallelism, the smallest device times their number), less what Petals forgets and then runs out of:
    the CUDA context, workspaces and fragmentation (gpu_reserve_bytes). On a CPU it shares the host's RAM: only what
    is available now counts, less `margin` of it for everyone else, and the sessions' history (kept in
    host memory, `history_bytes` per block, or `history_fixed` in all) counts beside the blocks.
    """
    if device_type == "cuda":
        reserve = gpu_reserve_bytes(device_memory, num_devices)
        memory, source = device_memory - reserve, "gpu"
    else:
        reserve = 0
        memory, source = int(available_memory * (1.0 - margin)) - history_fixed, "ram"
    autograd = autograd_bytes(hidden_size, num_devices)
    per_block = block_bytes + cache_bytes + adapter_bytes + (history_bytes if source == "ram" else 0)
    count = min(total_blocks, (memory - autograd) // per_block) if per_block > 0 else total_blocks
    estimate = Estimate(
        int(count), memory, autograd, block_bytes, cache_bytes, reserve, adapter_bytes, history_bytes, source
    )
    if count < 1:
        raise NotEnoughMemory(
            f"not enough memory for one block: {memory / GiB:.2f} GiB of {source}"
            + (f" (after {reserve / GiB:.2f} GiB for the CUDA context and fragmentation)" if reserve else "")
            + f", {autograd / GiB:.2f} GiB kept for "
            f"autograd, {per_block / GiB:.2f} GiB per block "
            f"(weights {block_bytes / GiB:.2f}, cache {cache_bytes / GiB:.2f}, "
            f"session history {history_bytes / GiB if source == 'ram' else 0:.2f}); "
            "pass --num_blocks or --block_indices, or lower --attn_cache_tokens"
        )
    return estimate
