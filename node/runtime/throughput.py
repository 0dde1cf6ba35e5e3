"""How many tokens per second the node is worth to the swarm (PROTOCOL 5.2).

Compute is measured on one block of the real architecture, dtype and quantization (random weights),
in the runtime process: inference steps (batch 1, one token, the cache growing) and forward passes
(batch 1, 1024 tokens). Results are cached per host in `<cache_dir>/throughput_v5.json` under the
Petals key scheme, guarded by an exclusive flock, so that a restart or a second node on the host does
not measure again. The network cannot be measured offline: `--network_bandwidth` says what it is, and
without it 100 Mbit/s is assumed, as Petals does when its speed test fails.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:  # torch is imported where it is needed: the supervisor uses the pure parts only
    import torch

CACHE_FILE = "throughput_v5.json"
LOCK_FILE = "throughput.lock"
DEFAULT_BANDWIDTH = 100e6  # bits/s


def device_name(device: "torch.device") -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} GPU"
    return "MPS" if device.type == "mps" else "CPU"


def dtype_name(dtype: str, quant_type: str) -> str:
    return dtype if quant_type in ("none", None) else f"{dtype}, quantized to {quant_type}"


def cache_key(model: str, device: torch.device, dtype: str, quant_type: str, tp_devices: Sequence = ()) -> str:
    key = f"model_{model}_device_{device_name(device).replace(' ', '_')}_dtype_{dtype_name(dtype, quant_type)}"
    if len(tp_devices) > 1:
        for i, tp_device in enumerate(tp_devices):
            key += f"_tp{i}_{device_name(tp_device).replace(' ', '_')}"
    return key


@contextmanager
def locked_cache(cache_dir: str):
    """The host's throughput cache, read and written under an exclusive lock (one measurer at a time)."""
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, LOCK_FILE), "wb+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        path = os.path.join(cache_dir, CACHE_FILE)
        try:
            with open(path) as f:
                cache = json.load(f)
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
            cache = {}
        before = json.dumps(cache, sort_keys=True)
        yield cache
        if json.dumps(cache, sort_keys=True) != before:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, path)


def measure_compute(
    block: torch.nn.Module,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
    inference_steps: int = 100,
    forward_steps: int = 10,
    forward_tokens: int = 1024,
) -> dict:
    """Steps per second of one block: single-token inference (the cache growing from empty) and
    forward passes of `forward_tokens` tokens, each after one warm-up."""
    import torch

    device = torch.device(device)

    def sync() -> None:  # this device only: a bare cuda.synchronize() waits on (and wakes) GPU 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    with torch.inference_mode():
        cache = tuple(
            torch.zeros(block.kv_cache_shape(1, inference_steps + 1), dtype=dtype, device=device) for _ in range(2)
        )
        token = torch.randn(1, 1, hidden_size, dtype=dtype, device=device)
        block(token, cache=cache, past=0)  # warm-up
        sync()
        began = time.perf_counter()
        for step in range(inference_steps):
            block(token, cache=cache, past=step)
        sync()
        inference_rps = inference_steps / (time.perf_counter() - began)

        hidden = torch.randn(1, forward_tokens, hidden_size, dtype=dtype, device=device)
        block(hidden)
        sync()
        began = time.perf_counter()
        for _ in range(forward_steps):
            block(hidden)
        sync()
        forward_rps = forward_steps * forward_tokens / (time.perf_counter() - began)
    return {"inference_rps": inference_rps, "forward_rps": forward_rps}


def network_rps(hidden_size: int, bandwidth_bits: Optional[float]) -> float:
    """Requests (tokens) per second the link carries: clients send 16-bit activations."""
    return (bandwidth_bits or DEFAULT_BANDWIDTH) / (hidden_size * 16)


def _usable(entry) -> bool:
    """A cached measurement whose figures are positive finite numbers (a damaged file's are measured again:
    a NaN or a negative throughput made every announcement fail)."""
    fields = ("inference_rps", "forward_rps", "network_rps")
    if not isinstance(entry, dict):
        return False
    try:
        return all(math.isfinite(float(entry[f])) and float(entry[f]) > 0 for f in fields)
    except (KeyError, TypeError, ValueError):
        return False


def get_throughput_info(
    cache_dir: str,
    key: str,
    measure: Callable[[], dict],
    hidden_size: int,
    bandwidth_bits: Optional[float],
    force: bool = False,
    log=None,
) -> dict:
    """The cached measurement for `key`, measuring (and caching) it when missing or when forced."""
    with locked_cache(cache_dir) as cache:
        if force or not _usable(cache.get(key)):
            began = time.perf_counter()
            cache[key] = dict(measure(), network_rps=network_rps(hidden_size, bandwidth_bits))
            if log is not None:
                log.info("throughput measured", key=key, seconds=round(time.perf_counter() - began, 1), **cache[key])
        info = dict(cache[key])
    if bandwidth_bits:  # a stated bandwidth beats whatever was cached
        info["network_rps"] = network_rps(hidden_size, bandwidth_bits)
    return info
