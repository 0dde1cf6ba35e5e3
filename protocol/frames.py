"""Tensors as raw ZeroMQ frames: a TensorMeta in the header, the bytes in a frame of their own.

Frames are views of the tensor memory (sent with copy=False) and tensors received are views of the
frame memory, so a tensor crosses a process boundary without being copied by Python.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import zmq

from protocol.messages import TensorMeta
from protocol.wire import ITEMSIZE

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Tensors made from received frames are only read; writers copy first (see from_frames).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class FrameError(ValueError):
    pass


def meta_of(tensor: torch.Tensor) -> TensorMeta:
    return TensorMeta(DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))


def frame_of(tensor: torch.Tensor):
    """A buffer over the tensor's bytes (the tensor is made contiguous on the CPU first)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    if tensor.numel() == 0:
        return b""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def to_frames(tensors: Sequence[torch.Tensor]) -> tuple[list[TensorMeta], list]:
    return [meta_of(t) for t in tensors], [frame_of(t) for t in tensors]


def from_frames(metas: Sequence[TensorMeta], frames: Sequence, names: Sequence[str] = ()) -> list[torch.Tensor]:
    """Tensors viewing the frames' memory (read-only: callers copy before writing in place)."""
    if len(metas) != len(frames):
        raise FrameError(f"message announces {len(metas)} tensors but carries {len(frames)} frames")
    out = []
    for i, (meta, frame) in enumerate(zip(metas, frames)):
        label = names[i] if i < len(names) else f"tensor {i}"
        dtype = DTYPES.get(meta.dtype)
        if dtype is None:
            raise FrameError(f"{label}: unsupported dtype {meta.dtype!r}")
        if any(d < 0 for d in meta.shape):
            raise FrameError(f"{label}: negative dimension in shape {list(meta.shape)}")
        buffer = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
        numel = 1
        for d in meta.shape:
            numel *= d
        expected = numel * ITEMSIZE[meta.dtype]
        if buffer.nbytes != expected:
            raise FrameError(f"{label}: {buffer.nbytes} bytes for {meta.dtype}{list(meta.shape)} (expected {expected})")
        if numel == 0:
            out.append(torch.empty(meta.shape, dtype=dtype))
        else:
            out.append(torch.frombuffer(buffer, dtype=dtype).reshape(meta.shape))
    return out
