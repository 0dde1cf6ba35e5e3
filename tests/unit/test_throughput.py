"""Throughput estimation (PROTOCOL 5.2): the measurement, its cache and what is announced."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

from node.runtime import throughput
from node.runtime.models import get_family
from node.supervisor.placement import server_throughput
from node.weights.checkpoint import Checkpoint
from tests.helpers.paths import MICRO_LLAMA


def test_cache_key_follows_the_petals_scheme():
    cpu = torch.device("cpu")
    assert (
        throughput.cache_key("bigscience/bloom", cpu, "bfloat16", "none")
        == "model_bigscience/bloom_device_CPU_dtype_bfloat16"
    )
    assert throughput.cache_key("m", cpu, "float32", "nf4") == "model_m_device_CPU_dtype_float32, quantized to nf4"
    assert throughput.cache_key("m", cpu, "float32", "none", [cpu, cpu]).endswith("_tp0_CPU_tp1_CPU")


def test_measured_once_then_read_from_the_cache(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return {"inference_rps": 100.0, "forward_rps": 5000.0}

    first = throughput.get_throughput_info(str(tmp_path), "k", measure, hidden_size=1024, bandwidth_bits=None)
    second = throughput.get_throughput_info(str(tmp_path), "k", measure, hidden_size=1024, bandwidth_bits=None)
    assert first == second and len(calls) == 1
    assert first["network_rps"] == 100e6 / (1024 * 16)  # 100 Mbit/s when the network is not stated
    cached = json.loads((tmp_path / "throughput_v5.json").read_text())
    assert cached["k"]["forward_rps"] == 5000.0
    forced = throughput.get_throughput_info(
        str(tmp_path), "k", measure, hidden_size=1024, bandwidth_bits=1e9, force=True
    )
    assert len(calls) == 2 and forced["network_rps"] == 1e9 / (1024 * 16)


def test_a_corrupt_cache_is_measured_again(tmp_path):
    (tmp_path / "throughput_v5.json").write_text("{not json")
    info = throughput.get_throughput_info(
        str(tmp_path), "k", lambda: {"inference_rps": 1.0, "forward_rps": 2.0}, 64, None
    )
    assert info["forward_rps"] == 2.0


@pytest.mark.parametrize("damaged", [float("nan"), -3.0, 0.0, "fast", None])
def test_a_cached_figure_that_is_not_a_positive_number_is_measured_again(tmp_path, damaged):
    """A NaN or negative throughput read from a damaged file made every announcement fail."""
    entry = {"inference_rps": 1.0, "forward_rps": damaged, "network_rps": 3.0}
    (tmp_path / "throughput_v5.json").write_text(json.dumps({"k": entry}))
    info = throughput.get_throughput_info(
        str(tmp_path), "k", lambda: {"inference_rps": 1.0, "forward_rps": 2.0}, 64, None
    )
    assert info["forward_rps"] == 2.0


def _hold_lock(cache_dir, ready, release):
    with throughput.locked_cache(cache_dir):
        ready.set()
        release.wait(10)


def test_the_cache_is_locked_while_measuring(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        got_it, go_on = ctx.Event(), ctx.Event()
        go_on.set()
        waiter = ctx.Process(target=_hold_lock, args=(str(tmp_path), got_it, go_on))
        waiter.start()
        assert not got_it.wait(1.0)  # blocked on the lock
        release.set()
        assert got_it.wait(10)
        waiter.join(10)
        assert waiter.exitcode == 0
    finally:
        release.set()
        holder.join(10)


def test_announced_throughput():
    info = {"forward_rps": 1000.0, "network_rps": 400.0}
    assert server_throughput(info, num_blocks=3, using_relay=False) == 400.0  # the network caps it
    assert server_throughput(info, num_blocks=9, using_relay=False) == 200.0  # 1000 / 5
    assert server_throughput(info, num_blocks=1, using_relay=True) == 80.0  # relay penalty


def test_compute_is_measured_on_a_real_block():
    checkpoint = Checkpoint.open(str(MICRO_LLAMA))
    config = checkpoint.config()
    block = get_family(config).block_class.from_state(
        config, checkpoint.block_state("model.layers.0.", dtype=torch.float32), dtype=torch.float32
    )
    info = throughput.measure_compute(
        block, 64, torch.float32, torch.device("cpu"), inference_steps=5, forward_steps=2, forward_tokens=64
    )
    assert info["inference_rps"] > 0 and info["forward_rps"] > 0
