"""Weight quantization of a loaded block with bitsandbytes (PROTOCOL 5.4, 5.5).

Every nn.Linear of the block is replaced: int8 by Linear8bitLt (no fp16 copy of the weights, outlier
threshold 6.0), nf4 by Linear4bit (blocks of 64 values, compressed statistics, computing in the
block's dtype). Norms, embeddings of positions and biases stay in the block's dtype.

The supervisor plans a quant_type without torch (node/supervisor/resolve.py: --quant_type, else nf4 on CUDA
and none elsewhere). A device that cannot run it (bitsandbytes missing or without kernels for it) is
found by the runtime with a trial on one small layer before any block is converted: it then serves
unquantized and logs a warning. The quant_type really served reaches ServerInfo by the one message
that already carries the runtime's measurements: Measured.quant_type (runtime -> supervisor), where
node/supervisor/placement.py adopts it into the supervisor's plan and passes it with the announced figures
(Announce.quant_type -> announcer). The size of a block under each quant_type is the torch-free
formula of node/supervisor/resources.py (block_size_bytes, PROTOCOL 5.4); block_memory measures the real one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from node.runtime.tensor_parallel.shard import carry_slice

QUANT_TYPES = ("none", "int8", "nf4")


class _Once(logging.Filter):
    """Lets each message template through once: bitsandbytes warns on every int8 matmul of inputs
    that are not float16 (every Linear of every request), which would bury everything else."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        return True


def _quiet_repeats() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in bnb_logger.filters):
        bnb_logger.addFilter(_Once())


class QuantizationUnavailable(RuntimeError):
    pass


def quantized_linear(linear: nn.Linear, quant_type: str, dtype: torch.dtype, device=None) -> nn.Module:
    """The layer quantized on `device` (default: where it is). bitsandbytes quantizes a layer's weights as
    they move from the host to the GPU, so a layer still on the host (the loader's host-first path) crosses
    once, already quantized; one on the GPU goes down and up again."""
    import bitsandbytes as bnb

    _quiet_repeats()

    device = linear.weight.device if device is None else torch.device(device)
    weight = linear.weight.data.to(dtype)
    if quant_type == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    elif quant_type == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
        )
    else:
        raise ValueError(f"unknown quant_type {quant_type!r}")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(dtype).cpu(), requires_grad=False)
    if quant_type == "nf4" and (linear.out_features % 64 or linear.in_features % 64):
        # bitsandbytes' packed CPU kernel needs both sizes in multiples of its tiles
        layer.support_avx512bf16_for_cpu = False
    return layer.to(device)  # bitsandbytes quantizes the weights as they move to the device


def quantize_block(block: nn.Module, quant_type: str, dtype: torch.dtype, device=None) -> nn.Module:
    """Every nn.Linear of the block quantized, on `device` (default: where each layer is)."""
    if quant_type == "none":
        return block
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, carry_slice(child, quantized_linear(child, quant_type, dtype, device)))
    block.compute_dtype = dtype  # the weights' dtype no longer tells the dtype the block computes in
    if getattr(block, "slow_tp", 1) != 1:
        block.slow_tp = 1  # BLOOM's sliced matmuls need the plain weights; quantized outputs differ anyway
    return block.requires_grad_(False).eval()


def check_quantization(quant_type: str, dtype: torch.dtype, device) -> None:
    """Raise QuantizationUnavailable unless one small layer quantizes and runs here."""
    if quant_type == "none":
        return
    try:
        torch.manual_seed(0)
        linear = nn.Linear(128, 128, bias=True).to(device=device, dtype=dtype)
        layer = quantized_linear(linear, quant_type, dtype)
        with torch.inference_mode():
            out = layer(torch.randn(2, 128, dtype=dtype, device=device))
        if out.shape != (2, 128) or not torch.isfinite(out).all():
            raise RuntimeError("the trial layer gave no finite output")
    except Exception as e:
        raise QuantizationUnavailable(
            f"{quant_type} quantization cannot run on {device} in {dtype}: {type(e).__name__}: {e}"
        ) from e


def block_memory(block: nn.Module) -> int:
    """Bytes the block's weights really take, quantization statistics included."""
    total = 0
    seen = set()
    for tensor in list(block.parameters()) + list(block.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=True).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        scb = getattr(tensor, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total
