"""From flags and the model's config to the node's plan (node/supervisor/resolve.py), in-process and in
the resolver's child process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from node.supervisor.config import parse_config
from tests.helpers.paths import MICRO_LLAMA, ROOT


def test_resolving_in_a_child_process(tmp_path):
    import asyncio

    from node.supervisor.config import parse_config
    from node.supervisor.resolve import ResolveError, resolve_in_child
    from tests.helpers.paths import MICRO_LLAMA

    config = parse_config(["--model", str(MICRO_LLAMA), "--dht_prefix", "micro-llama", "--block_indices", "1:3"])
    plan = asyncio.run(resolve_in_child(config, str(tmp_path)))
    assert (plan.family, plan.start_block, plan.end_block, plan.dht_prefix, plan.run_dir) == (
        "llama",
        1,
        3,
        "micro-llama",
        str(tmp_path),
    )
    config = parse_config(["--model", str(MICRO_LLAMA), "--dht_prefix", "micro-llama", "--block_indices", "0:9"])
    with pytest.raises(ResolveError, match="--block_indices: the model has 4 blocks") as caught:
        asyncio.run(resolve_in_child(config, str(tmp_path)))
    assert caught.value.usage


def test_public_reachability_is_checked_in_the_public_swarm_unless_skipped():
    from node.startup import transformers_without_torch
    from node.supervisor.resolve import resolve_plan

    transformers_without_torch()
    base = ["--model", str(MICRO_LLAMA), "--dht_prefix", "micro", "--block_indices", "0:2"]
    assert resolve_plan(parse_config(base), "/tmp/x", None).check_public_reachability
    assert not resolve_plan(
        parse_config(base + ["--skip_reachability_check"]), "/tmp/x", None
    ).check_public_reachability
    assert not resolve_plan(parse_config(base + ["--new_swarm"]), "/tmp/x", None).check_public_reachability


def test_num_blocks_larger_than_the_model_is_capped_with_a_warning(tmp_path):
    """As Petals does (its CI starts a server with --num_blocks 14 on an 8-block model)."""
    import msgspec

    config = parse_config(["--model", str(MICRO_LLAMA), "--dht_prefix", "micro", "--num_blocks", "14", "--new_swarm"])
    result = subprocess.run(
        [sys.executable, "-m", "node.supervisor.resolve", str(tmp_path)],
        input=msgspec.json.encode(config),
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    answer = msgspec.json.decode(result.stdout)
    assert answer["plan"]["wanted_blocks"] == 4, result.stderr.decode()[-2000:]
    assert b"--num_blocks is larger than the model" in result.stderr


def test_auto_dtype_on_the_cpu_follows_its_bfloat16_units(tmp_path, monkeypatch):
    """--torch_dtype auto on the CPU: bfloat16 where the CPU has AMX or AVX-512 BF16 units, float32 where it
    would only emulate it (six times slower at the 8B shape on an AVX2 machine), whatever the checkpoint
    declares; on a GPU it follows the checkpoint, as Petals does."""
    from types import SimpleNamespace

    from node.supervisor import resolve

    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n")
    assert resolve.cpu_bf16_units(str(amx)) and not resolve.cpu_bf16_units(str(avx2))
    assert not resolve.cpu_bf16_units(str(tmp_path / "missing"))

    half = SimpleNamespace(torch_dtype="float16")
    monkeypatch.setattr(resolve, "cpu_bf16_units", lambda: True)
    assert resolve.resolve_dtype("auto", half, "cpu") == "bfloat16"
    monkeypatch.setattr(resolve, "cpu_bf16_units", lambda: False)
    assert resolve.resolve_dtype("auto", half, "cpu") == "float32"
    assert resolve.resolve_dtype("bfloat16", half, "cpu") == "bfloat16"  # asked for: served, if slowly
    assert resolve.resolve_dtype("auto", half, "cuda") == "float16"
    assert resolve.resolve_dtype("auto", SimpleNamespace(torch_dtype="float32"), "cuda") == "bfloat16"
    with pytest.raises(resolve.PlanError, match="float16 is not supported on the CPU"):
        resolve.resolve_dtype("float16", half, "cpu")
