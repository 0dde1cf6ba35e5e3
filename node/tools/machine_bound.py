"""What this machine can do at all for a span of blocks, measured with torch alone (node.bench prints each
figure as a fraction of it).

A decode step must read every weight once, so it cannot take less than the blocks' bytes over the memory
bandwidth (measured as matrix-vector products of 14336 x 4096 weights, the size of an 8B MLP matrix, in
the fastest of the ways node/runtime/linear.py chooses from; MATRICES distinct ones in turn, so that a
large last-level cache cannot hold what is read: a Sapphire Rapids' holds most of one in bfloat16);
a forward of T tokens must do about 2 x parameters x T multiply-adds plus the attention's, so it cannot
take less than that over the best matrix-product speed (a 512 x 4096 by 4096 x 14336 product, in both
ways node/runtime/linear.py chooses from, the faster one counted: which one wins depends on the CPU and
its BLAS).
"""

from __future__ import annotations

import time

import torch

from node.runtime.linear import LINEAR, TRANSPOSED, VECTOR, product

ROWS, COLS, TOKENS = 14336, 4096, 512
MATRICES = 4  # read in turn for the memory figure: 470 MB in bfloat16, 940 MB in float32


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def measure(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> dict:
    """{"memory_gb_s", "matmul_gflop_s"} on `device` in `dtype`."""
    g = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(ROWS, COLS, generator=g, device=device).to(dtype)
    weights = [weight] + [torch.randn(ROWS, COLS, generator=g, device=device).to(dtype) for _ in range(MATRICES - 1)]
    vector = torch.randn(1, COLS, generator=g, device=device).to(dtype)
    tokens = torch.randn(TOKENS, COLS, generator=g, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn):
        def timed():
            fn()
            sync()

        return _best(timed, repeats)

    with torch.inference_mode():
        read = min(run(lambda: [product(vector, w, way) for w in weights]) for way in (LINEAR, TRANSPOSED, VECTOR))
        best = min(run(lambda: product(tokens, weight, way)) for way in (LINEAR, TRANSPOSED))
    return {
        "memory_gb_s": MATRICES * weight.numel() * weight.element_size() / read / 1e9,
        "matmul_gflop_s": 2 * ROWS * COLS * TOKENS / best / 1e9,
    }


def bounds(measured: dict, block_params: int, block_bytes: int, config, batch: int, length: int) -> dict:
    """The least time a decode step and a batch x length forward of the blocks can take here."""
    layers = config.num_hidden_layers
    flops = 2 * block_params * batch * length
    flops += layers * 4 * batch * length * length * config.hidden_size // 2  # causal scores and values
    forward_s = flops / (measured["matmul_gflop_s"] * 1e9)
    return {
        "decode_step_ms": 1000 * block_bytes / (measured["memory_gb_s"] * 1e9),
        "forward_s": forward_s,
        "forward_tokens_s": batch * length / forward_s,
    }
