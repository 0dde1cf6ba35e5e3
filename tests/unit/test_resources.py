"""How many blocks fit (PROTOCOL 5.3, 5.4, 5.7) and the next-server pings (2.4): pure functions."""

from __future__ import annotations

import math

import pytest

from node.allocator.budget import cache_bytes_per_block, history_bytes_per_block
from node.announcer.next_pings import NextPings, peers_to_ping
from node.supervisor import resources
from protocol.dht_records import ServerInfo, ServerState

GiB = 1024**3


def test_block_size_formula():
    assert resources.block_size_bytes(1000, "float32") == round(1000 * 4 * 1.01)
    assert resources.block_size_bytes(1000, "bfloat16") == round(1000 * 2 * 1.01)
    assert resources.block_size_bytes(1000, "bfloat16", "int8") == round(1000 * 1 * 1.01)
    assert resources.block_size_bytes(1000, "bfloat16", "nf4") == round(1000 * 4.25 / 8 * 1.01)


def test_cache_and_autograd_reserve():
    # Llama-2-70B-like: hidden 8192, 8 KV groups, 16384 tokens in bfloat16
    assert cache_bytes_per_block(8192, 16384, 8, 2) == 2 * 8192 * 16384 // 8 * 2
    assert resources.autograd_bytes(14336) == 2 * GiB
    assert resources.autograd_bytes(7168, num_devices=2) == 2 * GiB


def test_gpu_counts_its_total_memory_and_caps_at_the_model():
    estimate = resources.estimate_num_blocks(
        device_type="cuda",
        device_memory=80 * GiB,
        available_memory=1 * GiB,
        block_bytes=GiB,
        cache_bytes=GiB // 2,
        hidden_size=14336,
        total_blocks=80,
    )
    reserve = GiB + int(80 * GiB * 0.03)  # the CUDA context and workspaces, and fragmentation
    assert estimate.reserve == reserve == resources.gpu_reserve_bytes(80 * GiB)
    assert estimate.num_blocks == (80 * GiB - reserve - 2 * GiB) // (GiB + GiB // 2) == 49
    assert estimate.source == "gpu"
    group = resources.estimate_num_blocks(
        device_type="cuda",
        device_memory=2 * 80 * GiB,
        available_memory=0,
        block_bytes=GiB,
        cache_bytes=GiB // 2,
        hidden_size=14336,
        total_blocks=200,
        num_devices=2,
    )
    assert group.reserve == 2 * GiB + int(160 * GiB * 0.03)  # a context per device (and NCCL's buffers)
    small = resources.estimate_num_blocks(
        device_type="cuda",
        device_memory=80 * GiB,
        available_memory=0,
        block_bytes=GiB // 100,
        cache_bytes=0,
        hidden_size=1024,
        total_blocks=12,
    )
    assert small.num_blocks == 12


def test_cpu_keeps_a_margin_of_available_ram():
    estimate = resources.estimate_num_blocks(
        device_type="cpu",
        device_memory=64 * GiB,
        available_memory=10 * GiB,
        block_bytes=GiB,
        cache_bytes=0,
        hidden_size=0,
        total_blocks=80,
        margin=0.2,
    )
    assert estimate.num_blocks == 8 and estimate.source == "ram"


def test_session_history_counts_beside_blocks_in_ram_and_not_on_a_gpu():
    # Llama-2-70B-like: 16384 tokens of 8192 bfloat16 values per block: 4 x that block's GQA cache
    per_block = history_bytes_per_block(8192, 16384, resources.DTYPE_BYTES["bfloat16"])
    assert per_block == 16384 * 8192 * 2 == 4 * cache_bytes_per_block(8192, 16384, 8, 2)
    common = dict(block_bytes=GiB, cache_bytes=0, hidden_size=0, total_blocks=80, margin=0.0)
    cpu = resources.estimate_num_blocks(
        device_type="cpu", device_memory=0, available_memory=12 * GiB, history_bytes=GiB // 2, **common
    )
    assert cpu.num_blocks == 8 and cpu.history == GiB // 2
    fixed = resources.estimate_num_blocks(
        device_type="cpu", device_memory=0, available_memory=12 * GiB, history_fixed=4 * GiB, **common
    )
    assert fixed.num_blocks == 8
    gpu = resources.estimate_num_blocks(
        device_type="cuda", device_memory=12 * GiB, available_memory=0, history_bytes=GiB // 2, **common
    )
    # the history lives in host memory, not on the device: only the GPU's own reserve comes off its 12 GiB
    assert gpu.num_blocks == (12 * GiB - resources.gpu_reserve_bytes(12 * GiB)) // GiB == 10


def test_no_room_for_one_block_is_a_clear_error():
    with pytest.raises(resources.NotEnoughMemory, match="--num_blocks"):
        resources.estimate_num_blocks(
            device_type="cpu",
            device_memory=GiB,
            available_memory=GiB,
            block_bytes=2 * GiB,
            cache_bytes=0,
            hidden_size=1024,
            total_blocks=4,
        )


def _info(start, end, state=ServerState.ONLINE):
    return ServerInfo(state=state, throughput=1.0, start_block=start, end_block=end)


def test_peers_to_ping_are_those_after_our_span():
    infos = {b: {} for b in range(8)}
    for b in range(0, 4):
        infos[b]["me"] = _info(0, 4)
    for b in range(2, 6):
        infos[b]["mid"] = _info(2, 6)
    infos[4]["next"] = _info(4, 8)
    infos[4]["gone"] = _info(4, 5, ServerState.OFFLINE)
    infos[6]["far"] = _info(6, 8)
    assert sorted(peers_to_ping(infos, 0, 4, "me")) == ["mid", "next"]


def test_next_pings_are_smoothed_and_expire():
    now = [0.0]
    pings = NextPings(clock=lambda: now[0])
    pings.update("a", 0.1)
    pings.update("a", 0.2)
    assert pings.current()["a"] == pytest.approx(0.2 * 0.2 + 0.8 * 0.1)
    pings.update("a", math.inf)
    assert math.isinf(pings.current()["a"])
    pings.update("a", 0.3)  # after a failure the next answer counts in full
    assert pings.current()["a"] == pytest.approx(0.3)
    now[0] = 301.0
    assert pings.current() == {}
