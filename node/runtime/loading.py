"""How the runtime gets its blocks: read from the checkpoint, sharded for a tensor-parallel rank,
quantized, with the LoRA adapters attached; at start (procs/runtime_start.py, after the order to load) or
on a thread while serving (BlockLoader: a move that loads first).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Optional

from node.runtime import lora
from node.runtime.models import get_family
from node.runtime.quantize import quantize_block
from node.weights import checkpoint as checkpoint_lib
from node.weights import mapped
from node.weights.checkpoint import Checkpoint
from protocol.frames import DTYPES
from protocol.plan import NodePlan

if TYPE_CHECKING:
    from node.runtime.tensor_parallel.group import Group


def load_blocks(plan: NodePlan, log, indices=None, group: "Optional[Group]" = None) -> dict:
    """{global index: block} for `indices` (default: the plan's range), each read on its own; with a
    group, this rank's shard of each."""
    checkpoint = Checkpoint.of(plan)
    config = checkpoint.config()
    family = get_family(config)
    dtype = DTYPES[plan.torch_dtype]
    adapters = load_adapters(plan)
    blocks = {}
    # Weights that are reshaped before they are served (quantized, or cut into this rank's shard) are read and
    # reshaped on the host and cross to the GPU once, in their final form: read onto the GPU, a quantized
    # block's weights went back to the host and up again (bitsandbytes quantizes on the way up), and a shard
    # held the whole block on the device first.
    host_first = plan.device != "cpu" and (plan.quant_type != "none" or group is not None)
    where = "cpu" if host_first else plan.device
    if plan.device == "cpu" and plan.quant_type == "none" and group is None:
        host = checkpoint_lib.MAPPED  # served as the checkpoint holds it: from the file's map
    elif host_first or plan.device == "cpu":
        # Quantized or sharded on the host: what quantization and the shard leave in the file's map (norms,
        # biases, unquantized layers) is moved up (GPU) or copied out (CPU, mapped.take_out) after.
        host = checkpoint_lib.BORROWED
    else:
        host = checkpoint_lib.COPY  # read straight onto the device
    for index in range(plan.start_block, plan.end_block) if indices is None else indices:
        began = time.perf_counter()
        state = checkpoint.block_state(f"{family.block_prefix}.{index}.", dtype=dtype, device=where, host=host)
        block = family.block_class.from_state(config, state, dtype=dtype, device=where)
        if group is not None:
            block = block.shard(group.rank, group.world, None)
        block = quantize_block(block, plan.quant_type, dtype, device=plan.device)
        if host_first:
            block = block.to(plan.device)  # what quantization left on the host: norms, biases, unquantized layers
        elif host == checkpoint_lib.BORROWED:
            mapped.take_out(block, state.values())
        del state
        lora.attach(block, index, family.block_prefix, adapters, dtype, plan.device)
        blocks[index] = block
        log.info("block loaded", block=index, seconds=round(time.perf_counter() - began, 3))
    return blocks


def load_adapters(plan: NodePlan) -> list:
    """The plan's LoRA adapters, their files fetched into the model's cache (lora.AdapterError if not)."""
    return [
        lora.load_adapter(
            name,
            cache_dir=plan.cache_dir,
            token=plan.token,
            max_disk_space=plan.max_disk_space,
            download_attempts=plan.download_attempts,
        )
        for name in plan.adapters
    ]


class BlockLoader:
    """Loads blocks on a thread while the runtime serves (reading and converting weights mostly runs
    outside the GIL); the runtime installs them between rounds."""

    def __init__(self, plan: NodePlan, log, span: tuple[int, int], indices: list[int]):
        self.span = span
        self.blocks: dict = {}
        self.error: Optional[str] = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(plan, log, indices), name="loader", daemon=True).start()

    def _run(self, plan, log, indices) -> None:
        try:
            began = time.perf_counter()
            with side_stream(plan.device) as stream:
                self.blocks = load_blocks(plan, log, indices)
                if stream is not None:
                    stream.synchronize()  # every copy done before the runtime may use a block
            log.info(
                "new blocks loaded",
                blocks=list(self.span),
                loaded=indices,
                seconds=round(time.perf_counter() - began, 2),
            )
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done.set()


@contextlib.contextmanager
def side_stream(device: str):
    """On a GPU, the loader's copies and casts go to a CUDA stream of their own (current streams are per
    thread): on the default stream they would queue between the serving rounds' kernels and delay them."""
    if not device.startswith("cuda"):
        yield None
        return
    import torch

    stream = torch.cuda.Stream(device=torch.device(device))
    with torch.cuda.stream(stream):
        yield stream
