"""What a GPU host would meet first, checked without one: which device the node plans for, groups that
NCCL would refuse, every rank quantizing as rank 0 measured, the torch range the attention needs, and the
test launcher and the benchmark stating device, dtype and quantization instead of taking the machine's."""

from __future__ import annotations

import queue
import re
import threading
from types import SimpleNamespace

import pytest

from node.supervisor import resolve
from node.supervisor.config import parse_config
from tests.helpers.paths import ROOT


@pytest.mark.parametrize(
    "value, visible",
    [(None, True), ("0", True), ("3", True), ("1,2", True), ("GPU-5e0c4b1a", True), ("", False), ("-1", False)],
)
def test_cuda_visible_devices_decides_whether_gpus_are_seen(value, visible, monkeypatch):
    if value is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert resolve.gpus_visible() is visible


def test_any_gpu_device_node_counts_and_wsl2s_too(monkeypatch):
    nodes: list[str] = []
    monkeypatch.setattr(resolve.glob, "glob", lambda pattern: [n for n in nodes if n.startswith("/dev/nvidia")])
    exists = set()
    monkeypatch.setattr(resolve.os.path, "exists", lambda path: path in exists)
    assert not resolve.gpu_device_node()
    nodes.append("/dev/nvidia3")  # a container given GPU 3 has no /dev/nvidia0
    assert resolve.gpu_device_node()
    nodes.clear()
    exists.add("/dev/dxg")  # WSL2
    assert resolve.gpu_device_node()


def test_no_visible_gpu_plans_the_cpu_and_cuda_asked_for_is_refused(monkeypatch):
    monkeypatch.setattr(resolve, "cuda_available", lambda: False)
    monkeypatch.setattr(resolve, "mps_available", lambda: False)
    assert resolve.resolve_device(None) == "cpu"
    with pytest.raises(resolve.PlanError, match="--device: cuda:1 requested but CUDA is not available"):
        resolve.resolve_device("cuda:1")


@pytest.mark.parametrize("devices", [["cuda:0", "cuda:0"], ["cuda", "cuda:0"], ["cuda:1", "cuda:0", "cuda:1"]])
def test_a_gpu_named_twice_in_a_group_is_refused_at_start(devices, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["m", "--tensor_parallel_devices", *devices])
    assert exit_info.value.code == 2
    assert "NCCL cannot run two ranks on one GPU" in capsys.readouterr().err
    assert parse_config(["m", "--tensor_parallel_devices", "cuda:0", "cuda:1"]).tensor_parallel_devices
    assert parse_config(["m", "--tensor_parallel_devices", "cpu", "cpu"]).tensor_parallel_devices  # gloo can


def test_every_rank_loads_with_the_quantization_rank_0_measured():
    """Rank 0 falls back to `none` where nf4 cannot run; the supervisor learns it from the measurement and
    orders every rank's load with it, so a follower never quantizes on its own plan's word."""
    from procs.runtime_start import wait_for_load_order
    from protocol.messages import LoadBlocks

    log = SimpleNamespace(info=lambda *a, **k: None)
    actor = SimpleNamespace(
        plan=SimpleNamespace(start_block=0, end_block=0, quant_type="nf4"),
        control_inbox=queue.Queue(),
        stopping=threading.Event(),
        log=log,
    )
    actor.control_inbox.put(LoadBlocks(0, 2, quant_type="none"))
    assert wait_for_load_order(actor)
    assert (actor.plan.start_block, actor.plan.end_block, actor.plan.quant_type) == (0, 2, "none")
    actor.control_inbox.put(LoadBlocks(2, 4))  # no word on quantization: the plan's stands
    assert wait_for_load_order(actor) and actor.plan.quant_type == "none"


def test_the_torch_range_has_what_the_attention_calls_need():
    """scaled_dot_product_attention(enable_gqa=...) came with torch 2.5: a lower bound below it would let
    pip install a torch on which every forward raises."""
    uses = [p for p in (ROOT / "node").rglob("*.py") if "enable_gqa" in p.read_text()]
    assert uses
    pyproject = (ROOT / "pyproject.toml").read_text()
    low = re.search(r'"torch>=(\d+)\.(\d+)', pyproject)
    assert low and (int(low.group(1)), int(low.group(2))) >= (2, 5)


def test_the_launcher_states_device_dtype_and_quantization():
    """(node.bench states them too: tests/integration/test_bench.py reads them back from its JSON.)"""
    from node.tools.launcher import NodeProcess

    argv = NodeProcess("m", ROOT / "runs" / "x").argv
    for flag, value in (("--device", "cpu"), ("--quant_type", "none"), ("--torch_dtype", "float32")):
        assert argv[argv.index(flag) + 1] == value
    config = parse_config(NodeProcess("m", ROOT / "runs" / "x", "--device", "cuda", "--quant_type", "nf4").argv[3:])
    assert (config.device, config.quant_type) == ("cuda", "nf4")  # a test that asks for them gets them
