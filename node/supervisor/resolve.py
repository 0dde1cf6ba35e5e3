"""From flags and the model's config to the node's plan (PROTOCOL 2.1, 5.5, 5.6).

Everything that can be decided before any process starts is decided here, once: the model family,
the block range, the dht prefix, the dtype and device, and the defaults that depend on attention.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import os
import sys
from typing import Optional

import msgspec

from node.runtime.tensor_parallel.split import check_split
from node.supervisor.config import MODEL_DEFAULTS, PUBLIC_INITIAL_PEERS, NodeConfig
from node.supervisor.resources import autograd_bytes
from node.weights import default_cache_dir
from protocol import SERVER_VERSION
from protocol.plan import NodePlan
from protocol.wire import COMPRESSION_NAMES


class PlanError(ValueError):
    """A setting that cannot work with this model or machine; the message names the flag."""


def cuda_available() -> bool:
    """Whether this torch build can use an NVIDIA GPU here, without importing torch (seconds and
    hundreds of MB in the supervisor): a CUDA build of torch, a GPU this process may see
    (CUDA_VISIBLE_DEVICES) and a GPU device node (/dev/nvidiaN, any N: a container given GPU 3 has only
    /dev/nvidia3; /dev/dxg under WSL2). The runtime checks again with torch itself and stops the node
    with a clear message if this was wrong."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    version = {}
    try:
        with open(os.path.join(spec.submodule_search_locations[0], "version.py")) as f:
            exec(f.read(), version)
    except OSError:
        return False
    return bool(version.get("cuda")) and gpus_visible() and gpu_device_node()


def gpus_visible() -> bool:
    """False when CUDA_VISIBLE_DEVICES hides every GPU: empty, or starting with an invalid entry such as -1
    (CUDA reads the list up to its first invalid entry)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return True
    first = visible.split(",")[0].strip()
    return bool(first) and not first.startswith("-")


def gpu_device_node() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")


def mps_available() -> bool:
    """Whether torch can use an Apple GPU here (macOS only: torch is imported only there)."""
    if sys.platform != "darwin":
        return False
    import torch

    return bool(torch.backends.mps.is_available())


def resolve_device(requested) -> str:
    """The device to serve on: what --device asks for, checked, or Petals' default (cuda, else mps, else cpu)."""
    if requested:
        if requested.startswith("cuda") and not cuda_available():
            raise PlanError(f"argument --device: {requested} requested but CUDA is not available")
        if requested in ("mps", "mps:0"):
            if not mps_available():
                raise PlanError(
                    f"argument --device: {requested} requested but this torch cannot use an Apple GPU here "
                    "(MPS needs macOS on Apple silicon and a torch built with MPS); use cpu"
                )
            return "mps"
        if requested != "cpu" and not requested.startswith("cuda"):
            raise PlanError(f"argument --device: {requested!r} is not supported (use cpu, cuda, cuda:N or mps)")
        return requested
    if cuda_available():
        return "cuda"
    return "mps" if mps_available() else "cpu"


def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX-512 BF16). Without them torch
    emulates bfloat16: at the 8B block shape on a 2-core AVX2 EPYC a 4 x 128 forward took 42 s in bfloat16
    against 6.7 s in float32 (a decode step 93 ms against 148 ms: half the bytes to read)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(requested: str, model_config, device: str) -> str:
    if requested == "auto" and device == "cpu":
        # bfloat16 where the CPU has the units for it (twice float32's speed at that shape with AMX), else
        # float32, whatever the checkpoint declares (float16 does not run on the CPU)
        dtype = "bfloat16" if cpu_bf16_units() else "float32"
    elif requested == "auto":
        # transformers >= 4.56 calls it `dtype` (and warns on `torch_dtype`); older versions `torch_dtype`
        declared = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
        declared = str(declared).replace("torch.", "") if declared is not None else None
        dtype = "bfloat16" if declared in (None, "auto", "float32") else declared
    else:
        dtype = requested
    if dtype not in ("float32", "bfloat16", "float16"):
        raise PlanError(
            f"argument --torch_dtype: the model declares {dtype}, which the node does not serve; pass --torch_dtype"
        )
    if dtype == "float16" and device == "cpu":
        raise PlanError("argument --torch_dtype: float16 is not supported on the CPU; use bfloat16 or float32")
    if dtype == "bfloat16" and device == "mps":
        dtype = "float16"  # as Petals: its MPS path has no bfloat16
    return dtype


def resolve_plan(config: NodeConfig, run_dir: str, log) -> NodePlan:
    from node.runtime.models import get_family
    from node.weights.checkpoint import Checkpoint

    cache_dir = config.cache_dir or default_cache_dir()
    checkpoint = Checkpoint.of(config)
    model_config = checkpoint.config()
    try:
        family = get_family(model_config)
    except ValueError as e:
        raise PlanError(f"argument --model: {e}") from None

    total = model_config.num_hidden_layers
    if config.block_indices:
        start, end = config.block_indices
        if end > total:
            raise PlanError(f"argument --block_indices: the model has {total} blocks, cannot serve {start}:{end}")
    else:
        start = end = 0  # chosen by the supervisor once the runtime has measured the device
        if config.num_blocks is not None and config.num_blocks > total:  # as Petals does
            if log is not None:
                log.warning(
                    "--num_blocks is larger than the model; serving all of its blocks",
                    num_blocks=config.num_blocks,
                    total_blocks=total,
                )
            config = msgspec.structs.replace(config, num_blocks=total)

    if config.dht_prefix:
        prefix = config.dht_prefix
    elif checkpoint.is_local:
        raise PlanError("argument --dht_prefix: required when the model is a local directory")
    else:
        prefix = family.default_dht_prefix(checkpoint.name)

    device = resolve_device(config.device)
    geometry = family.geometry(model_config)
    tp_devices = list(config.tensor_parallel_devices or ())
    if len(tp_devices) > 1:
        for requested in tp_devices:
            resolve_device(requested)
        try:
            check_split(model_config, geometry, len(tp_devices))
        except ValueError as e:
            raise PlanError(f"argument --tensor_parallel_devices: {e}") from None
        device = tp_devices[0]  # rank 0 receives the work and returns the outputs (Petals: outputs on --device)
    elif tp_devices:
        device, tp_devices = resolve_device(tp_devices[0]), []  # a group of one is a plain node
    dtype = resolve_dtype(config.torch_dtype, model_config, device)
    kv_groups = family.kv_groups_for_budget(model_config)

    def by_model(flag: str) -> int:
        with_gqa, without = MODEL_DEFAULTS[flag]
        return with_gqa if kv_groups > 1 else without

    # nf4 by default on CUDA, as Petals does; the runtime falls back to none if the device cannot run it
    quant_type = config.quant_type or ("nf4" if device.startswith("cuda") else "none")

    if isinstance(config.throughput, float):
        throughput, mode = config.throughput, "fixed"
    else:
        throughput, mode = 0.0, config.throughput or "auto"

    update_period = config.update_period
    return NodePlan(
        run_dir=run_dir,
        version=SERVER_VERSION,
        model=config.model,
        revision=config.revision,
        token=config.token,
        cache_dir=cache_dir,
        max_disk_space=config.max_disk_space,
        download_attempts=config.download_attempts,
        family=family.name,
        dht_prefix=prefix,
        repository=checkpoint.repository,
        total_blocks=total,
        start_block=start,
        end_block=end,
        choose_blocks=config.block_indices is None,
        wanted_blocks=config.num_blocks,
        hidden_size=model_config.hidden_size,
        num_attention_heads=geometry.num_heads,
        num_kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim,
        kv_groups=kv_groups,
        torch_dtype=dtype,
        device=device,
        tensor_parallel_devices=tp_devices,
        quant_type=quant_type,
        adapters=list(config.adapters),
        max_batch_size=config.max_batch_size or by_model("max_batch_size"),
        inference_max_length=config.inference_max_length or by_model("inference_max_length"),
        attn_cache_tokens=config.attn_cache_tokens or by_model("attn_cache_tokens"),
        max_chunk_size_bytes=config.max_chunk_size_bytes,
        autograd_bytes=autograd_bytes(model_config.hidden_size, max(1, len(tp_devices))),
        max_alloc_timeout=config.max_alloc_timeout,
        request_timeout=config.request_timeout,
        session_timeout=config.session_timeout,
        step_timeout=config.step_timeout,
        compression=COMPRESSION_NAMES.index(config.compression),
        max_sessions=config.max_sessions,
        max_sessions_per_peer=config.max_sessions_per_peer,
        max_bytes_in_flight=config.max_bytes_in_flight,
        max_peer_bytes_in_flight=config.max_peer_bytes_in_flight,
        history_bytes=config.history_bytes,
        initial_peers=config.peers,
        public_name=config.public_name,
        throughput=throughput,
        throughput_mode=mode,
        network_bandwidth=config.network_bandwidth,
        update_period=update_period,
        expiration=config.expiration or max(2 * update_period, 3),
        num_handlers=config.num_handlers,
        heartbeat_timeout=config.heartbeat_timeout,
        shutdown_grace=config.shutdown_grace,
        check_public_reachability=config.peers == PUBLIC_INITIAL_PEERS and not config.skip_reachability_check,
        log_format=config.log_format,
        log_level=config.log_level,
    )


def default_run_dir() -> str:
    return os.path.join("/tmp", f"node.{os.getpid()}")


# --- in a child process: the supervisor keeps transformers out of its own memory ---------------------
# Reading a model's config takes transformers (without torch: still numpy, tokenizers, the hub client,
# about 37 MiB) that the supervisor would hold for the node's whole life to use once. So it runs
# `python -m node.supervisor.resolve RUN_DIR` with the NodeConfig as JSON on stdin and reads back one JSON object:
# {"plan": NodePlan} or {"error": message, "usage": bool} (usage: a PlanError, naming its flag).


class ResolveError(Exception):
    def __init__(self, message: str, usage: bool):
        super().__init__(message)
        self.usage = usage


class _Answer(msgspec.Struct, omit_defaults=True):
    plan: Optional[NodePlan] = None
    error: str = ""
    usage: bool = False


async def resolve_in_child(config: NodeConfig, run_dir: str) -> NodePlan:
    """resolve_plan in `python -m node.supervisor.resolve`; ResolveError if it cannot be made."""
    from node.startup import stop_with_parent
    from node.supervisor.processes import child_env

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "node.supervisor.resolve",
        run_dir,
        env=child_env(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=stop_with_parent,
    )
    try:
        out, _ = await child.communicate(msgspec.json.encode(config))
    except asyncio.CancelledError:
        if child.returncode is None:
            child.kill()
        raise
    try:
        answer = msgspec.json.decode(out, type=_Answer)
    except (msgspec.DecodeError, msgspec.ValidationError):
        answer = _Answer(error=f"the model resolver exited with code {child.returncode} and no answer")
    if answer.plan is None:
        raise ResolveError(answer.error or "the model resolver gave no plan", answer.usage)
    return answer.plan


def main() -> None:
    import traceback

    from node import logs, startup

    config = msgspec.json.decode(sys.stdin.buffer.read(), type=NodeConfig)
    log = logs.setup("resolve", config.log_level, config.log_format)
    startup.transformers_without_torch()  # the supervisor reads configs here, but runs no model
    logs.route_transformers_logs()
    try:
        answer = _Answer(plan=resolve_plan(config, sys.argv[1], log))
    except PlanError as e:
        answer = _Answer(error=str(e), usage=True)
    except (OSError, ValueError) as e:
        answer = _Answer(error=f"argument --model: cannot load {config.model}: {e}", usage=True)
    except Exception as e:  # a bug or a broken install: the supervisor reports it and exits 1
        traceback.print_exc()
        answer = _Answer(error=f"cannot resolve the model: {type(e).__name__}: {e}")
    sys.stdout.buffer.write(msgspec.json.encode(answer))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
