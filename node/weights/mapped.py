"""Weights served straight from the checkpoint file's memory map.

A CPU runtime that serves a block unchanged (the checkpoint's dtype, not quantized, not sharded) keeps
the tensors safetensors maps (a private, copy-on-write map of the file) instead of copying them into
memory of its own: copying 3.5 GB of 8B-shape blocks took 1.7-2.1 s from the page cache and 6 s from the
disk, the largest part of the cold start (docs/benchmarks.md, "The cold start: blocks served from the
file's map"); the map costs 0.1 s. The Petals server serves mapped weights too.

What the map changes, and how the node answers it:
- Nothing would be read until the first request touches it: `fault_in` reads and maps every page before
  the block is served, so the first step does not wait on the disk.
- The kernel counts clean file pages as available memory, our own weights included: `resident_bytes`
  is what the runtime takes off the host's available memory (node/runtime/capacity.py).
- Under memory pressure the kernel may drop weight pages and read them again on use (slower steps
  instead of the OOM killer), and a checkpoint file deleted or evicted from the hub cache while a node
  maps it keeps its disk space until the node lets go of the block.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import sys
from typing import TYPE_CHECKING, Optional

from node import host_memory

if TYPE_CHECKING:
    import torch

MADV_POPULATE_READ = 22  # Linux 5.14: read and map every page of the range, synchronously
PAGE = 4096

_files_before: Optional[int] = None  # RssFile when this process first kept a weight mapped
_populate_works = sys.platform.startswith("linux")


@functools.cache
def _madvise_function():
    """madvise(2) with its argument types set, once; None where there is no C library to call."""
    madvise = getattr(host_memory.libc(), "madvise", None)
    if madvise is not None:
        madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise


def _madvise(start: int, length: int, advice: int) -> int:
    """0, or the errno of madvise(2) (ENOSYS where there is no C library to call)."""
    madvise = _madvise_function()
    if madvise is None:
        return errno.ENOSYS
    return 0 if madvise(start, length, advice) == 0 else ctypes.get_errno()


def fault_in(tensor: "torch.Tensor") -> None:
    """Reads every page of a (contiguous, CPU) tensor into memory and maps it, now."""
    global _populate_works, _files_before
    if _files_before is None:
        _files_before = _mapped_file_bytes() or 0
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return
    if _populate_works:
        start = tensor.data_ptr() & ~(PAGE - 1)
        error = _madvise(start, tensor.data_ptr() + nbytes - start, MADV_POPULATE_READ)
        if error == 0:
            return
        if error in (errno.EINVAL, errno.ENOSYS):  # a kernel older than 5.14: touch the pages instead
            _populate_works = False
        else:
            raise OSError(error, f"madvise(MADV_POPULATE_READ) of a weight failed: {errno.errorcode.get(error)}")
    import torch

    flat = tensor.detach().reshape(-1).view(torch.uint8)
    int(flat[::PAGE].sum())  # one byte of every page: each fault brings its page (and neighbours) in


def resident_bytes() -> int:
    """About the bytes of weights this process serves from checkpoint maps: the file pages it has mapped
    beyond those it had before it first kept a weight mapped (its libraries', which grow a little later
    on: the error counts against available memory, the safe side). 0 where the kernel does not say."""
    if _files_before is None:
        return 0
    now = _mapped_file_bytes()
    return max(0, now - _files_before) if now is not None else 0


def _mapped_file_bytes(status_path: str = "/proc/self/status") -> Optional[int]:
    """RssFile: the resident file pages this process maps (a counter the kernel keeps: no page walk, unlike
    smaps, which took 30 ms with 4 8B-shape blocks mapped)."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def take_out(module: "torch.nn.Module", borrowed) -> None:
    """Copies into memory of our own every CPU parameter and buffer of `module` that still lies in one of
    the `borrowed` tensors (a block quantized or sharded on the host keeps its norms and biases, or views of
    the map, as they were): one tensor kept from a map keeps the whole file mapped, and every page read
    through it resident."""
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in borrowed if t.device.type == "cpu"]

    def inside(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and any(low <= t.data_ptr() < high for low, high in ranges)

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and inside(param):
                param.data = param.data.clone()  # the same object: a quantized layer's Params keep their state
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and inside(buffer):
                sub._buffers[name] = buffer.clone()
