"""A serving dtype against float32 on the same blocks: how far its outputs are from a float32 reference, and
how long each takes, on this machine (issue 22 item 5: whether bfloat16 wins on a CPU, in speed and error).

    python -m node.tools.dtype_error (--model PATH | --preset NAME) [--dtype bfloat16] [--tokens 128]
                                     [--steps 8] [--json FILE]

The node's own blocks (node/runtime/loading.py) are loaded twice, in float32 and in `--dtype`, from the
same checkpoint; a session of one sequence goes through all of them in both: a prefill of `--tokens`
random hidden states, then `--steps` one-token steps, each with its attention cache (node/runtime/compute.py,
as the runtime runs them). For the prefill and for each step, the error of the `--dtype` output against
the float32 one: the largest absolute difference over the largest absolute float32 value, and the norm
of the difference over the float32 norm. The times are of the same calls (best of the steps, the prefill
once). Whether this CPU has bfloat16 units is printed beside them: without AMX or AVX-512 BF16, torch
emulates bfloat16 and its times say nothing of a CPU that has them, while its errors do (the products
accumulate in float32 either way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

EMULATED = ": bfloat16 is emulated, its times are not those of a CPU with them"


def _plan(model: str, dtype: str, run_dir: str, n_blocks: int):
    from node.startup import transformers_without_torch
    from node.supervisor.config import parse_config
    from node.supervisor.resolve import resolve_plan

    transformers_without_torch()
    flags = ["--model", model, "--dht_prefix", "dtype-error", "--block_indices", f"0:{n_blocks}", "--new_swarm"]
    flags += ["--device", "cpu", "--torch_dtype", dtype, "--quant_type", "none"]
    return resolve_plan(parse_config(flags), run_dir, None)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.float(), ref.float()
    diff = out - ref
    return float(diff.abs().max() / ref.abs().max()), float(diff.norm() / ref.norm())


class _Session:
    """One sequence through every block, with its attention cache (made as the runtime makes it), in the
    blocks' dtype."""

    def __init__(self, blocks: list, dtype: torch.dtype, max_length: int):
        from node.runtime.kv_cache import SessionCaches

        self.blocks, self.dtype = blocks, dtype
        caches = SessionCaches(dtype, torch.device("cpu"))
        self.cache = caches.get(0, 1, max_length, 0, len(blocks), 0, blocks).kv
        self.position = 0

    def step(self, hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
        from node.runtime import compute

        work = compute.Work(0, len(self.blocks), hidden.to(self.dtype), self.cache, self.position)
        began = time.perf_counter()
        out = compute.run(self.blocks, [work], 1 << 30)[0]
        seconds = time.perf_counter() - began
        self.position += hidden.shape[1]
        return out, seconds


def measure(model: str, dtype: str, tokens: int, steps: int, seed: int = 0) -> dict:
    import structlog

    from node.runtime.loading import load_blocks
    from node.weights.checkpoint import Checkpoint
    from protocol.frames import DTYPES

    log = structlog.get_logger()  # no global grad switch: a caller (a test process) keeps its own
    with tempfile.TemporaryDirectory() as run_dir:
        probe = _plan(model, "float32", run_dir, 1)
        config = Checkpoint.of(probe).config()
        n_blocks = config.num_hidden_layers
        sessions = {}
        for name in ("float32", dtype):
            plan = _plan(model, name, run_dir, n_blocks)
            blocks = load_blocks(plan, log)
            sessions[name] = _Session([blocks[i] for i in range(n_blocks)], DTYPES[name], tokens + steps)
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(1, tokens, config.hidden_size, generator=g)]
    inputs += [torch.randn(1, 1, config.hidden_size, generator=g) for _ in range(steps)]
    rows = []
    for hidden in inputs:
        ref, ref_s = sessions["float32"].step(hidden)
        out, out_s = sessions[dtype].step(hidden)
        max_err, norm_err = _errors(out, ref)
        rows.append(
            {
                "tokens": hidden.shape[1],
                "max_rel": max_err,
                "norm_rel": norm_err,
                "float32_s": ref_s,
                f"{dtype}_s": out_s,
            }
        )
    decode = rows[1:]
    from node.supervisor.resolve import cpu_bf16_units

    return {
        "model": model,
        "dtype": dtype,
        "blocks": n_blocks,
        "hidden_size": config.hidden_size,
        "cpu_bf16_units": cpu_bf16_units(),
        "prefill": rows[0],
        "decode_max_rel": max((r["max_rel"] for r in decode), default=None),
        "decode_norm_rel_mean": statistics.mean(r["norm_rel"] for r in decode) if decode else None,
        "decode_float32_s": min((r["float32_s"] for r in decode), default=None),
        f"decode_{dtype}_s": min((r[f"{dtype}_s"] for r in decode), default=None),
        "steps": rows,
    }


def report(figures: dict) -> str:
    d, p = figures["dtype"], figures["prefill"]
    units = "has" if figures["cpu_bf16_units"] else "has no"
    lines = [
        f"{figures['blocks']} blocks of hidden {figures['hidden_size']}, {d} against float32 (this CPU {units} "
        f"bfloat16 units{'' if figures['cpu_bf16_units'] else EMULATED})",
        f"prefill of {p['tokens']} tokens: error max {p['max_rel']:.2e}, norm {p['norm_rel']:.2e}; "
        f"{p[f'{d}_s']:.3f} s against {p['float32_s']:.3f} s in float32 ({p['float32_s'] / p[f'{d}_s']:.2f}x)",
    ]
    if figures["decode_max_rel"] is not None:
        fs, ds = figures["decode_float32_s"], figures[f"decode_{d}_s"]
        lines.append(
            f"{len(figures['steps']) - 1} one-token steps: error max {figures['decode_max_rel']:.2e}, norm (mean) "
            f"{figures['decode_norm_rel_mean']:.2e}; {1000 * ds:.1f} ms against {1000 * fs:.1f} ms in float32 "
            f"({fs / ds:.2f}x)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.tools.dtype_error", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local model directory (a family the node serves)")
    source.add_argument("--preset", help="a random Llama made here with seed 0 (node/tools/tinymodel.py)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=128, help="prefill length")
    parser.add_argument("--steps", type=int, default=8, help="one-token steps after the prefill")
    parser.add_argument("--json", help="write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.steps < 0:
        parser.error("--tokens must be at least 1 and --steps at least 0")
    with tempfile.TemporaryDirectory() as work:
        model = args.model
        if model is None:
            from node.tools.tinymodel import PRESETS, make_preset

            if args.preset not in PRESETS:
                parser.error(f"--preset: choose from {', '.join(PRESETS)}")
            model = make_preset(str(Path(work) / args.preset), args.preset, seed=0)
        figures = measure(model, args.dtype, args.tokens, args.steps)
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
