"""A CPU block served as the checkpoint holds it is served from the file's map (node/weights/mapped.py):
its weights are the file's pages, all in memory before the block is served, private to the node (a write
never reaches the file), and not counted as memory the host has available. Blocks that are reshaped on
the way (another dtype, quantized) are in memory of the node's own, with no copy of the file's tensors
made before they are reshaped."""

import json
import os
import subprocess
import sys

import msgspec
import pytest
import safetensors
import safetensors.torch
import structlog
import torch

from node.runtime import capacity
from node.runtime.loading import load_blocks
from node.weights import mapped
from node.weights.checkpoint import BORROWED, COPY, MAPPED, Checkpoint
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.plans import micro_plan

WEIGHTS = os.path.join(str(MICRO_LLAMA), "model.safetensors")


def mapping_of(tensor: torch.Tensor):
    """(path, resident bytes) of the mapping that holds the tensor's first byte; path None if anonymous."""
    ptr = tensor.data_ptr()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line
                low, high = (int(x, 16) for x in fields[0].split("-"))
                inside = low <= ptr < high
                path = fields[5] if len(fields) > 5 else None
            elif inside and fields[0] == "Rss:":
                return path, int(fields[1]) * 1024
    raise AssertionError("the tensor's address is in no mapping")


def weights(blocks):
    return [p for block in blocks.values() for p in block.parameters()]


def tensors(blocks):
    return weights(blocks) + [b for block in blocks.values() for b in block.buffers()]


def test_a_block_in_the_checkpoint_dtype_is_served_from_the_file_all_of_it_in_memory(tmp_path):
    blocks = load_blocks(micro_plan(str(tmp_path)), structlog.get_logger())
    for weight in weights(blocks):
        path, resident = mapping_of(weight)
        assert path == WEIGHTS
        assert resident >= weight.numel() * weight.element_size()


def test_blocks_reshaped_on_the_way_are_in_memory_of_their_own(tmp_path):
    for flags in (("--torch_dtype", "bfloat16"), ("--quant_type", "int8"), ("--quant_type", "nf4")):
        blocks = load_blocks(micro_plan(str(tmp_path), *flags), structlog.get_logger())
        for tensor in tensors(blocks):
            assert mapping_of(tensor)[0] != WEIGHTS, flags


def test_a_checkpoint_read_is_copied_by_default_and_borrowed_left_in_the_map():
    checkpoint = Checkpoint.open(str(MICRO_LLAMA))
    state = checkpoint.block_state("model.layers.0.", dtype=torch.float32)
    assert all(mapping_of(t)[0] != WEIGHTS for t in state.values())
    borrowed = checkpoint.block_state("model.layers.0.", dtype=torch.float32, host=BORROWED)
    assert all(mapping_of(t)[0] == WEIGHTS for t in borrowed.values())  # for a caller that converts them all
    with pytest.raises(ValueError, match="host must be one of"):
        checkpoint.block_state("model.layers.0.", dtype=torch.float32, host="kept")


def test_a_write_to_a_mapped_weight_never_reaches_the_file():
    state = Checkpoint.open(str(MICRO_LLAMA)).block_state("model.layers.1.", dtype=torch.float32, host=MAPPED)
    name = "mlp.up_proj.weight"
    assert mapping_of(state[name])[0] == WEIGHTS
    before = state[name].clone()
    state[name].add_(1.0)
    with safetensors.safe_open(WEIGHTS, framework="pt") as f:
        assert torch.equal(f.get_tensor(f"model.layers.1.{name}"), before)


PROBE = """
import json, torch, structlog
from node.runtime.loading import load_blocks
from node.weights import mapped
from tests.helpers.plans import micro_plan
plan = micro_plan({run!r})
before = [mapped.resident_bytes(), mapped._mapped_file_bytes()]
blocks = load_blocks(plan, structlog.get_logger())
size = sum(p.numel() * p.element_size() for b in blocks.values() for p in b.parameters())
print(json.dumps(before + [mapped.resident_bytes(), mapped._mapped_file_bytes(), size]))
"""


def test_the_mapped_weights_are_in_memory_and_counted_as_the_runtime_s_own(tmp_path):
    probe = PROBE.format(run=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=os.getcwd(), check=True
    )
    counted_before, files_before, counted, files, size = json.loads(out.stdout.strip().splitlines()[-1])
    assert counted_before == 0
    assert files - files_before >= size  # every page of the weights was read and mapped before serving
    assert size <= counted < size + 16 * 2**20  # the blocks, plus what libraries fault in meanwhile


def test_the_host_s_available_memory_leaves_out_the_mapped_weights(monkeypatch):
    import psutil

    class Ram:
        total, available = 64 * 2**30, 10 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Ram)
    monkeypatch.setattr(mapped, "resident_bytes", lambda: 3 * 2**30)
    assert capacity.device_memory(torch.device("cpu")) == (64 * 2**30, 7 * 2**30)


@pytest.mark.parametrize("kernel", ["5.14 or later", "older: pages touched"])
def test_fault_in_reads_and_maps_every_page_of_a_tensor(tmp_path, monkeypatch, kernel):
    if kernel.startswith("older"):
        monkeypatch.setattr(mapped, "_populate_works", False)
    path = str(tmp_path / "big.safetensors")
    safetensors.torch.save_file({"w": torch.randn(2048, 4096)}, path)  # 32 MiB
    with safetensors.safe_open(path, framework="pt") as f:
        weight = f.get_tensor("w")
    assert mapping_of(weight)[1] < 2**20  # a map: nothing read yet
    mapped.fault_in(weight)
    assert mapping_of(weight)[1] >= 32 * 2**20


class Captured(Exception):
    pass


@pytest.mark.parametrize(
    "device, flags, host",
    [
        ("cpu", (), MAPPED),
        ("cpu", ("--quant_type", "int8"), BORROWED),  # quantized on the host, then what is left in the map copied out
        ("cuda:0", ("--quant_type", "nf4"), BORROWED),  # quantized on the host, then every tensor moved up
        ("cuda:0", (), COPY),  # read straight onto the device: nothing stays in the map either way
    ],
)
def test_how_each_kind_of_block_holds_its_host_tensors(tmp_path, monkeypatch, device, flags, host):
    plan = msgspec.structs.replace(micro_plan(str(tmp_path), *flags), device=device)
    seen = []

    def block_state(self, prefix, *, dtype, device="cpu", host=COPY):
        seen.append((device, host))
        raise Captured  # before anything touches the device

    monkeypatch.setattr(Checkpoint, "block_state", block_state)
    with pytest.raises(Captured):
        load_blocks(plan, structlog.get_logger())
    assert seen[0][1] == host
    assert seen[0][0] == ("cpu" if host == BORROWED else device)


def test_take_out_copies_only_what_lies_in_the_borrowed_tensors_and_keeps_each_parameter_object():
    state = Checkpoint.open(str(MICRO_LLAMA)).block_state("model.layers.2.", dtype=torch.float32, host=BORROWED)
    module = torch.nn.Linear(64, 64, bias=False)
    module.weight = torch.nn.Parameter(state["mlp.up_proj.weight"][:64], requires_grad=False)  # a view of the map
    module.register_buffer("own", torch.ones(3))
    param, own = module.weight, module.own
    mapped.take_out(module, state.values())
    assert module.weight is param and mapping_of(module.weight)[0] != WEIGHTS
    assert torch.equal(module.weight, state["mlp.up_proj.weight"][:64])
    assert module.own is own  # not from the map: left as it was
