"""Linear layers that multiply the fastest of torch's ways on the CPU, chosen per weight shape and size of
input, by timing them on the first input of each size class.

`x @ W.T` (F.linear, what transformers runs) and `(W @ x.T).T` compute the same product, and for one row
so does `torch.mv(W, x)`; the BLAS behind torch does not run them equally fast, and which one wins depends
on the CPU, the BLAS, the dtype, the shape and the number of rows. On the 2-core AVX2 EPYC of
docs/benchmarks.md, for Llama-3.1-8B's matrices in float32: 8 rows (a round of 8 decoding sessions) 1.3
to 1.5 times faster transposed, 32 rows 1.6 to 1.9, 512 rows between 0.8 and 1.8 by shape, 1 row the
same. On a 2-core Sapphire Rapids Xeon in bfloat16, one row (a decode step): the MLP's down projection
(4096 x 14336) 14.7 ms through F.linear, 4.5 ms through torch.mv; the others 15% faster through mv. So
each (weight shape, dtype, nearest power of two of rows) is timed every way on its first input (each
way warmed up first, then timed twice), and the fastest way (another than F.linear only if it wins by
10%) serves it from then on: the same input always gets the same way, so results stay reproducible
within a runtime.
Only plain Linear layers on the CPU are concerned (quantized layers and GPUs keep their own kernels).
The choices are kept in a file of the node's run directory (`remember`): a runtime that replaces a crashed
one makes the same choices at once, instead of timing every product again in its first requests (the
rebuild of the sessions' caches: a 513-token prefill of the 8B blocks took 11.6 s timing, 7.5 s after).
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

TRIALS = 2  # timings of each way, the fastest counted
MARGIN = 0.9  # the transposed way must take under this share of F.linear's time
MAX_ROWS_CLASS = 1 << 14
# the ways (False and True, as older choice files hold them, are LINEAR and TRANSPOSED)
LINEAR, TRANSPOSED, VECTOR = 0, 1, 2  # x @ W.T (F.linear), (W @ x.T).T, torch.mv(W, x) for one row

_chosen: dict[tuple, int] = {}  # (out, in, dtype, rows class) -> way
_file: Optional[str] = None  # where the choices are kept (remember)


def remember(path: str) -> int:
    """Read the choices kept at `path` (a damaged or missing file: none) and keep new ones there; returns
    how many were read."""
    global _file
    _file = path
    try:
        with open(path) as f:
            kept = json.load(f)
        loaded = {(int(o), int(i), getattr(torch, d), int(r)): _way(t, int(r)) for o, i, d, r, t in kept}
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
    _chosen.update(loaded)
    return len(loaded)


def _way(value, rows_class_: int) -> int:
    way = int(value)
    if way not in (LINEAR, TRANSPOSED, VECTOR) or (way == VECTOR and rows_class_ != 1):
        raise ValueError(f"not a way for {rows_class_} rows: {value!r}")
    return way


def _keep() -> None:
    if _file is None:
        return
    rows = [[o, i, str(d).replace("torch.", ""), r, int(t)] for (o, i, d, r), t in _chosen.items()]
    temporary = f"{_file}.{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            json.dump(rows, f)
        os.replace(temporary, _file)  # a reader never sees half a file
    except OSError:
        pass  # only a later runtime's first requests are slower


def rows_class(rows: int) -> int:
    """The power of two nearest to `rows` (on a log scale): a 513-row rebuild after 512-token prefills
    finds their choice instead of timing the 8B shape's products again (about 0.4 s of its first pass)."""
    below = 1 << max(0, rows.bit_length() - 1)
    return min(MAX_ROWS_CLASS, 2 * below if rows * rows > 2 * below * below else below)


def product(x: torch.Tensor, weight: torch.Tensor, way: int, bias: Optional[torch.Tensor] = None):
    """x [rows, in] times weight [out, in] transposed, plus bias: F.linear's way, the transposed one, or
    (one row) a matrix-vector product."""
    if way == LINEAR:
        return F.linear(x, weight, bias)  # the bias fused, as nn.Linear computes it
    if way == VECTOR:
        out = torch.mv(weight, x[0]).unsqueeze(0)
    else:
        out = torch.mm(weight, x.t()).t().contiguous()
    return out if bias is None else out + bias


def _choose(key: tuple, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Times every way on `x` and keeps the choice; returns it and the product of the chosen way (the
    input's own output). Each way runs once untimed first: the first product of a shape pays for what the
    later ones find ready (its kernel's set-up, the output's memory, the threads waking), and timed cold,
    whichever way ran first lost (on the 8b preset in bfloat16 a fresh process chose the transposed way for
    2 of the 4 products of a 512-row forward, then F.linear for all 4 once warm, which is faster there).
    Then each is timed TRIALS times, the fastest counted: a choice is made once per size class in the
    node's life (`remember`), so a few products more at its first input buy a choice noise did not make."""
    ways = (LINEAR, TRANSPOSED, VECTOR) if x.shape[0] == 1 else (LINEAR, TRANSPOSED)
    best: dict[int, float] = {}
    outputs: dict[int, torch.Tensor] = {}
    for way in ways:  # in the caller's grad mode: the output returned may be part of a backward
        outputs[way] = product(x, weight, way, bias)
    for _ in range(TRIALS):
        for way in ways:
            began = time.perf_counter()
            product(x, weight, way, bias)
            took = time.perf_counter() - began
            best[way] = min(took, best.get(way, took))
    fastest = min(ways[1:], key=best.__getitem__)
    _chosen[key] = chosen = fastest if best[fastest] < MARGIN * best[LINEAR] else LINEAR
    _keep()
    return chosen, outputs[chosen]


class TunedLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose product is chosen as the module says.

    Each layer keeps its choices by exact number of rows (`ways`): a decode step of a small model runs
    dozens of these, and looking the choice up again each time cost more than the product itself."""

    ways: dict  # rows -> way (set here or, for a layer made a TunedLinear in place, by `tune`)

    def __init__(self, *args, **kwargs):  # a copy made with type(layer)(...), e.g. a tensor-parallel shard
        super().__init__(*args, **kwargs)
        self.ways = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.numel() // shape[-1] if len(shape) >= 2 and shape[-1] else 0
        way = self.ways.get(rows)
        if way is None:
            way, out = self._choose(x, rows)
            if out is not None:
                return out.view(*shape[:-1], self.weight.shape[0])
        if way == LINEAR:
            return F.linear(x, self.weight, self.bias)
        weight = self.weight
        flat = x.reshape(rows, shape[-1])
        return product(flat, weight, way, self.bias).view(*shape[:-1], weight.shape[0])

    def _choose(self, x: torch.Tensor, rows: int) -> tuple[int, Optional[torch.Tensor]]:
        """The way for inputs of `rows` rows, and x's product where choosing it computed that."""
        weight = self.weight
        if x.device.type != "cpu" or x.dtype != weight.dtype or rows == 0:
            return LINEAR, None  # F.linear as it is (not remembered: another input of these rows may qualify)
        key = (weight.shape[0], weight.shape[1], weight.dtype, rows_class(rows))
        way, out = _chosen.get(key), None
        if way is None:
            way, out = _choose(key, x.reshape(rows, x.shape[-1]), weight, self.bias)
        self.ways[rows] = way
        return way, out


def tune(block: nn.Module) -> nn.Module:
    """Makes every plain CPU Linear of `block` a TunedLinear (in place: the same parameters)."""
    for module in block.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu":
            module.__class__ = TunedLinear
            module.ways = {}
    return block
