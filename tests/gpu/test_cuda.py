"""The one-shot GPU check's tests (run by `python -m node.gpu_check`, which says how to read them; all carry the
`gpu` marker and skip without CUDA).

Every family's blocks on the device, in float32 and bfloat16, against the same blocks in float32 on the CPU:
two sessions batched in one pass, a long prefill computed in chunks, single-token decoding, hypo_ids with a
rollback, and a backward. In bfloat16 the attention must run in a fused kernel (SDPA restricted to flash,
memory-efficient and cuDNN: a call that would need the unfused math kernel raises); in float32 whether it can is
recorded. Host synchronizations in the decode steps are counted. Quantization (nf4, int8) of each family with a
backward; the capacity measurement and one block's load time; a micro node on the device passing the CPU node's
checks, then its runtime killed and a session rebuilt.

NODE_CHECK_DEVICE (default cuda) names the device; NODE_CHECK_DEVICE=cpu runs the same code on the CPU, which
checks this module's code, not CUDA. NODE_CHECK_OUT names a folder: each test appends its figures to
figures.jsonl there.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from node.runtime import compute
from node.runtime.models import get_family
from node.weights.checkpoint import Checkpoint
from tests.helpers.families import VARIANTS, Model, hidden_states, make_model
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import rel_err

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("NODE_CHECK_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
# relative to the largest magnitude of the float32 CPU reference: float32 kernels differ in summation order;
# bfloat16 keeps 8 bits of mantissa
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
FAMILIES = ["llama", *sorted(VARIANTS)]


def record(name: str, **figures) -> None:
    out = os.environ.get("NODE_CHECK_OUT")
    if out:
        with open(Path(out) / "figures.jsonl", "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


@contextlib.contextmanager
def fused_only(required: bool):
    """SDPA limited to its fused CUDA kernels: a call that needs the math kernel raises."""
    if not ON_CUDA or not required:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        yield


@contextlib.contextmanager
def counted_syncs(counter: list):
    """Count the host synchronizations CUDA reports (torch.cuda.set_sync_debug_mode) inside the block."""
    if not ON_CUDA:
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        counter.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    if request.param == "llama":
        path = str(MICRO_LLAMA)
    else:
        model_type, kwargs, layout = VARIANTS[request.param]
        path = make_model(tmp_path_factory.mktemp(request.param), model_type, kwargs, layout)
    m = Model(path)  # float32 blocks on the CPU: the reference
    m.name, m.path = request.param, path
    return m


def device_blocks(model: Model, dtype: torch.dtype) -> list:
    checkpoint = Checkpoint.open(model.path)
    prefix = model.family.block_prefix
    return [
        model.family.block_class.from_state(
            model.config, checkpoint.block_state(f"{prefix}.{i}.", dtype=dtype), dtype=dtype, device=DEVICE
        )
        for i in range(model.n)
    ]


def new_cache(blocks, batch: int, max_length: int, dtype, device) -> list:
    return [
        tuple(torch.full(b.kv_cache_shape(batch, max_length), float("nan"), dtype=dtype, device=device) for _ in "kv")
        for b in blocks
    ]


def on(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.to(DEVICE, dtype=dtype or t.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_blocks_on_the_device_equal_the_cpu(model, dtype):
    """Against the same blocks on the CPU in the same dtype (the device's kernels are what is checked); in
    bfloat16 the error against the float32 CPU blocks is recorded beside it (bfloat16 itself costs that)."""
    name = f"{model.name}/{str(dtype).replace('torch.', '')}"
    blocks, h, n = device_blocks(model, dtype), model.config.hidden_size, model.n
    tol, errors, fused = TOL[dtype], {}, dtype == torch.bfloat16
    float32 = model
    if dtype != torch.float32:
        model = Model(model.path, dtype=dtype)
    against_float32 = {}

    def check(what: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
        errors[what] = max(errors.get(what, 0.0), rel_err(ours.float().cpu(), ref.float()))

    if not fused:  # float32: record whether the fused kernels can take every call, then run as served
        try:
            with fused_only(True), torch.inference_mode():
                compute.run(blocks, [compute.Work(0, n, on(hidden_states(1, 9, h), dtype), None, 0)], 2**28)
            fused_float32 = True
        except RuntimeError:
            fused_float32 = False
        record(name, fused_kernels_in_float32=fused_float32)

    with fused_only(fused):
        # two sessions in one pass, at different positions (as the runtime batches them)
        a, b = hidden_states(2, 12, h, seed=9), hidden_states(1, 9, h, seed=10)
        with torch.inference_mode():
            ca, cb = new_cache(blocks, 2, 12, dtype, DEVICE), new_cache(blocks, 1, 9, dtype, DEVICE)
            ra, rb = model.new_cache(2, 12), model.new_cache(1, 9)
            works = [compute.Work(0, n, on(a[:, :10], dtype), ca, 0), compute.Work(0, n, on(b[:, :4], dtype), cb, 0)]
            first = compute.run(blocks, works, 2**28)
            works = [compute.Work(0, n, on(a[:, 10:], dtype), ca, 10), compute.Work(0, n, on(b[:, 4:], dtype), cb, 4)]
            second = compute.run(blocks, works, 2**28)
            ref_a = [model.step(a[:, :10], ra, 0), model.step(a[:, 10:], ra, 10)]
            ref_b = [model.step(b[:, :4], rb, 0), model.step(b[:, 4:], rb, 4)]
        check("batched sessions", torch.cat([first[0].cpu(), second[0].cpu()], 1), torch.cat(ref_a, 1))
        check("batched sessions", torch.cat([first[1].cpu(), second[1].cpu()], 1), torch.cat(ref_b, 1))

        # a long prefill in chunks of a few rows of scores (--max_chunk_size_bytes), then decoding
        x = hidden_states(1, 300, h, seed=3)
        with torch.inference_mode():
            cache = new_cache(blocks, 1, 310, dtype, DEVICE)
            out = on(x[:, :290], dtype)
            for block, kv in zip(blocks, cache):
                out = block(out, cache=kv, past=0, max_chunk_bytes=64 * 1024)
            syncs: list = []
            steps = []
            with counted_syncs(syncs):
                for t in range(290, 300):
                    step = on(x[:, t : t + 1], dtype)
                    for block, kv in zip(blocks, cache):
                        step = block(step, cache=kv, past=t)
                    steps.append(step)
            reference = model.ours(x)
            against_float32["prefill+decode"] = rel_err(
                torch.cat([out.float().cpu(), *[s.float().cpu() for s in steps]], 1), float32.ours(x)
            )
        check("chunked prefill", out.cpu(), reference[:, :290])
        check("decode", torch.cat([s.cpu() for s in steps], 1), reference[:, 290:])

        # hypo_ids and a rollback: prefill 16, back to 12 with the rows swapped, 8 more tokens
        x, y = hidden_states(2, 16, h, seed=2), hidden_states(2, 8, h, seed=5)
        with torch.inference_mode():
            cache = new_cache(blocks, 2, 24, dtype, DEVICE)
            for past, part in ((0, x[:, :13]), (13, x[:, 13:16])):
                step = on(part, dtype)
                for block, kv in zip(blocks, cache):
                    step = block(step, cache=kv, past=past)
            compute.reorder_cache(cache, torch.tensor([1, 0], device=DEVICE))
            outs = []
            for past, part in [(12, y[:, :3])] + [(12 + t, y[:, t : t + 1]) for t in range(3, 8)]:
                step = on(part, dtype)
                for block, kv in zip(blocks, cache):
                    step = block(step, cache=kv, past=past)
                outs.append(step.cpu())
            reference = model.ours(torch.cat([x[[1, 0], :12], y], dim=1))[:, 12:]
        check("hypo_ids+rollback", torch.cat(outs, 1), reference)

        # backward with deep prompts
        x, grad_out = hidden_states(2, 11, h, seed=3), hidden_states(2, 11, h, seed=4)
        prompts = hidden_states(n * 2, 3, h, seed=6).view(n, 2, 3, h) * 0.5
        grad_x, grad_prompts = compute.backward(blocks, on(x, dtype), on(grad_out, dtype), on(prompts, dtype))
        ref_x, ref_prompts = compute.backward(model.blocks, x.to(dtype), grad_out.to(dtype), prompts.to(dtype))
        check("backward: inputs", grad_x.cpu(), ref_x)
        check("backward: prompts", grad_prompts.cpu(), ref_prompts)

    record(
        name, errors=errors, against_float32=against_float32, host_syncs_in_10_decode_steps=syncs[0] if syncs else None
    )
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{name}: {worst} relative error {errors[worst]:.3g} > {tol} ({errors})"


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_quantized_blocks_serve_and_train_on_the_device(model, quant_type):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (on the lent machine: .whl/quant)")
    from node.runtime.quantize import quantize_block

    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    name = f"{model.name}/{quant_type}"
    plain = device_blocks(model, dtype)
    quantized = [quantize_block(copy.deepcopy(b), quant_type, dtype) for b in plain]
    h, n = model.config.hidden_size, model.n
    x = hidden_states(2, 7, h, seed=1)
    with torch.inference_mode():
        expected = compute.run(plain, [compute.Work(0, n, on(x, dtype), None, 0)], 2**28)[0]
        got = compute.run(quantized, [compute.Work(0, n, on(x, dtype), None, 0)], 2**28)[0]
    update = rel_err(got.float().cpu() - x, expected.float().cpu() - x)
    grad_x, _ = compute.backward(quantized, on(x, dtype), on(hidden_states(2, 7, h, seed=2), dtype), None)
    record(name, update_rel_err=update, grad_finite=bool(torch.isfinite(grad_x).all()))
    assert torch.isfinite(got).all() and torch.isfinite(grad_x).all()
    assert update <= {"int8": 0.1, "nf4": 0.5}[quant_type] * n, f"{name}: {update:.3g}"


def test_capacity_measurement_and_block_load_time(tmp_path):
    """What the runtime does before the node joins: one block of the real architecture made on the device
    (node.runtime.capacity.random_block), and one block of Llama-3.1-8B's shape loaded quantized by the
    two paths: read onto the device then quantized (the weights go down to the host and up again) and the
    loader's host-first path (node/runtime/loading.py: quantized on the way up, once). Both give the same block."""
    from transformers import LlamaConfig

    from node.runtime.capacity import block_params, random_block
    from node.runtime.quantize import quantize_block

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=1
    )
    family = get_family(config)
    dtype = torch.bfloat16
    began = time.perf_counter()
    random_block(family.block_class, config, dtype, DEVICE)
    built = time.perf_counter() - began
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in family.block_class(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for k, shape in shapes.items()}

    def sync():
        if ON_CUDA:
            torch.cuda.synchronize(DEVICE)

    try:
        import bitsandbytes  # noqa: F401

        quant = "nf4"
    except ImportError:
        quant = "none"
    began = time.perf_counter()
    device_first = family.block_class.from_state(
        config, {k: v.to(DEVICE) for k, v in state.items()}, dtype=dtype, device=DEVICE
    )
    device_first = quantize_block(device_first, quant, dtype)
    sync()
    device_first_s = time.perf_counter() - began
    began = time.perf_counter()
    host_first = family.block_class.from_state(config, state, dtype=dtype, device="cpu")
    host_first = quantize_block(host_first, quant, dtype, device=DEVICE).to(DEVICE)
    sync()
    host_first_s = time.perf_counter() - began
    x = on(hidden_states(1, 5, 4096), dtype)
    with torch.inference_mode():
        same = rel_err(host_first(x).float().cpu(), device_first(x).float().cpu())
    record(
        "capacity and loading",
        random_block_s=built,
        quant_type=quant,
        load_device_first_s=device_first_s,
        load_host_first_s=host_first_s,
        host_first_vs_device_first=same,
        block_params=block_params(family.block_class, config),
    )
    assert same <= 1e-6, same
    assert all(p.device.type == torch.device(DEVICE).type for p in host_first.parameters())


def test_a_micro_node_on_the_device_passes_the_cpu_nodes_checks_and_rebuilds_a_session(tmp_path, monkeypatch):
    from node.client.swarm import Client
    from node.tools.launcher import NodeProcess
    from tests.helpers import node_checks
    from tests.helpers.reference import hf_blocks
    from tests.helpers.waiting import wait_until

    monkeypatch.setattr(node_checks, "TOL", TOL[torch.float32])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(MICRO_LLAMA), dtype=torch.float32).eval()
    flags = ["--device", DEVICE, "--quant_type", "none", "--num_handlers", "2", "--heartbeat_timeout", "5"]
    with NodeProcess(MICRO_LLAMA, tmp_path / "node", *flags) as node:
        with Client(node.maddrs, "micro-llama") as client:
            failed = []
            for check in [getattr(node_checks, n) for n in dir(node_checks) if n.startswith("check_")]:
                try:
                    check(client, hf)
                except AssertionError as e:
                    failed.append(f"{check.__name__}: {e}")
            torch.manual_seed(11)
            hidden = torch.randn(1, 12, 64)
            reference = hf_blocks(hf, hidden, 0, 4)
            with client.session(max_length=12, start=0, end=4) as session:
                outs = [session.step(hidden[:, :8])]
                old = node.status["actors"]["runtime.0"]["pid"]
                os.kill(old, signal.SIGKILL)
                wait_until(lambda: node.status["actors"]["runtime.0"]["pid"] != old, 60, "a new runtime", node)
                outs += [session.step(hidden[:, t : t + 1]) for t in range(8, 12)]
            rebuilt = rel_err(torch.cat(outs, 1), reference)
    record("micro node", failed_checks=failed, rebuilt_session_rel_err=rebuilt)
    assert not failed, failed
    assert rebuilt <= TOL[torch.float32]
