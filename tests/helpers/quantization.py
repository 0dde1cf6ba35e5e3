"""How close a quantized block must stay to the unquantized one, and how to tell its layers apart."""

from __future__ import annotations

from torch import nn

# largest relative error of a quantized block's output (what it adds to the residual) against the
# whole-precision block's
BOUND = {"int8": 0.05, "nf4": 0.25}


def plain_linears(block: nn.Module) -> list:
    import bitsandbytes as bnb

    return [
        m
        for m in block.modules()
        if isinstance(m, nn.Linear) and not isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    ]
