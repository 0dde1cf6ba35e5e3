"""A block's share on one rank of a tensor-parallel group, and the reductions that make the group's
result equal the whole block's.

A sharded block computes, on each rank, the part of every attention and MLP branch that its heads and
columns give (a partial sum of the branch output); the branch outputs are all-reduced, so every rank
leaves the block with the same hidden states. For backward, the gradient reaching a branch input is
also partial on each rank and is all-reduced on the way back (Megatron's "f" and "g" operators):
`Split` marks where a branch starts (input replicated, gradient summed), `Reduce` where it ends
(output summed, gradient passed as it is). Without autograd both reduce to one all_reduce per branch.

Each family's block has a `shard(rank, world, group)` method that slices its weights with the
helpers below (node/runtime/tensor_parallel/split.py says which heads and columns go where).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def split_input(x: torch.Tensor, group) -> torch.Tensor:
    if not torch.is_grad_enabled() or not x.requires_grad:
        return x
    return _SumGrad.apply(x, group)


def reduce_output(x: torch.Tensor, group) -> torch.Tensor:
    if not torch.is_grad_enabled() or not x.requires_grad:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x
    return _SumOut.apply(x, group)


class Split(nn.Module):
    """A layer at the start of a branch: its input is the same on every rank."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group

    @property
    def weight(self) -> torch.Tensor:  # blocks read their dtype from a weight
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(split_input(x, self.group))


class Reduce(nn.Module):
    """A layer at the end of a branch: the partial outputs of all ranks are summed, then the bias added
    once (it was taken out of the sliced layer)."""

    def __init__(self, inner: nn.Module, group, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.inner = inner
        self.group = group
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_output(self.inner(x), self.group)
        return out if self.bias is None else out + self.bias


class Region(nn.Module):
    """A whole branch on one rank (a mixture of experts: the router on every rank, each expert's
    columns split): input split, output reduced."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_output(self.inner(split_input(x, self.group)), self.group)


def sliced(linear: nn.Linear, rows=None, cols=None, bias: bool = True) -> nn.Linear:
    """A copy of `linear` (same class) keeping output features `rows` (an index tensor or slice) and
    input features `cols`; without its bias when `bias` is False."""
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    keep_bias = bias and linear.bias is not None
    with torch.device("meta"):
        out = type(linear)(weight.shape[1], weight.shape[0], bias=keep_bias)
    out.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    if keep_bias:
        b = linear.bias.data if rows is None else linear.bias.data[rows]
        out.bias = nn.Parameter(b.contiguous().clone(), requires_grad=False)
    # LoRA weights loaded later are checked against the whole layer and cut the same way (node/lora.attach)
    out.tp_slice = (rows, cols, weight_shape(linear))
    return out


def carry_slice(old: nn.Module, new: nn.Module) -> nn.Module:
    """Keep the record of how a layer was cut when it is replaced (by its quantized version)."""
    if hasattr(old, "tp_slice"):
        new.tp_slice = old.tp_slice
    return new


def weight_shape(layer: nn.Module) -> tuple[int, int]:
    return (layer.out_features, layer.in_features)


def slice_of(layer: nn.Module) -> tuple:
    """(rows, cols, the whole layer's (out, in) features) of what this shard of a layer holds;
    (None, None, its own features) when it was not cut."""
    return getattr(layer, "tp_slice", (None, None, weight_shape(layer)))


WRAPPER_ATTRIBUTE = "inner"  # Split, Reduce and Region hold the layer or branch they wrap under this name


def column(linear: nn.Linear, rows, group) -> Split:
    return Split(sliced(linear, rows=rows), group)


def row(linear: nn.Linear, cols, group) -> Reduce:
    bias = None if linear.bias is None else linear.bias.data.clone()
    return Reduce(sliced(linear, cols=cols, bias=False), group, bias)


def head_rows(first: int, last: int, head_dim: int) -> slice:
    return slice(first * head_dim, last * head_dim)


def mlp(module: nn.Module, ups: tuple[str, ...], down: str, rank: int, world: int, width: str, group) -> None:
    """A two-layer MLP cut along its width (the config's name for it: `width`): this rank keeps its columns
    of the `ups` layers (applied to the whole input) and the matching rows of `down`, reduced once."""
    from node.runtime.tensor_parallel.split import even_split

    first, last = even_split(getattr(module, ups[0]).out_features, world, width)[rank]
    for name in ups:
        setattr(module, name, column(getattr(module, name), slice(first, last), group))
    setattr(module, down, row(getattr(module, down), slice(first, last), group))
