"""A node with `--tensor_parallel_devices cpu cpu`: two runtime processes (gloo) serve micro-llama to the
project's Petals-speaking client, with the same results as a single-device node (test_node.py's checks,
run again here against the group), and the group survives the loss of either rank."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from node.tools.launcher import NodeProcess
from tests.helpers import node_checks
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import hf_blocks, rel_err
from tests.helpers.waiting import wait_online_with_new_group

TOL = 1e-5
RECOVERY = 60.0  # seconds: two runtimes re-import torch, rejoin and reload on a 2-core machine


# test_node.py's checks, against the tensor-parallel node
test_forward_equals_transformers = node_checks.check_forward_equals_transformers
test_forward_with_deep_prompts = node_checks.check_forward_with_deep_prompts
test_backward_equals_transformers = node_checks.check_backward_equals_transformers
test_large_forward_uses_stream_and_matches = node_checks.check_large_forward_uses_stream_and_matches
test_inference_equals_full_forward = node_checks.check_inference_equals_full_forward
test_inference_rollback = node_checks.check_inference_rollback
test_inference_hypo_ids_reorder_cache = node_checks.check_inference_hypo_ids_reorder_cache
test_greedy_generation_equals_transformers = node_checks.check_greedy_generation_equals_transformers
test_inference_with_deep_prompts = node_checks.check_inference_with_deep_prompts


@pytest.fixture(scope="module")
def micro_node(tmp_path_factory):
    node = NodeProcess(
        MICRO_LLAMA,
        tmp_path_factory.mktemp("nodes") / "tp",
        "--tensor_parallel_devices",
        "cpu",
        "cpu",
        "--heartbeat_timeout",
        "5",
    )
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def micro_client(micro_node):
    from node.client.swarm import Client

    client = Client(micro_node.maddrs, "micro-llama")
    yield client
    client.close()


def test_two_runtime_processes_each_with_its_shard(micro_node):
    actors = micro_node.status["actors"]
    assert {"runtime.0", "runtime.1"} <= set(actors) and all(actors[n]["ready"] for n in ("runtime.0", "runtime.1"))
    assert actors["runtime.0"]["pid"] != actors["runtime.1"]["pid"]
    ready = [e for e in micro_node.log_events() if e.get("event") == "actor ready" and e.get("actor") == "runtime.1"]
    assert ready and (ready[-1]["rank"], ready[-1]["device"]) == (1, "cpu")


def test_cache_tokens_count_one_device(micro_client, micro_node):
    """Each rank holds one of micro-llama's two KV heads: a session costs half of what it does on one device."""
    info = micro_client.rpc_info(micro_node.peer_id, "micro-llama.0")
    assert info["cache_tokens_available"] == 2 * 65536


@pytest.mark.parametrize("rank", ["runtime.1", "runtime.0"])
def test_killing_one_rank_restarts_the_group_and_the_session_goes_on(micro_node, micro_client, micro_hf, rank):
    """kill -9 of one rank during a session: the whole group restarts (JOINING, then ONLINE) and the
    session's next step, held by the frontend meanwhile, is answered on the new group with its cache
    rebuilt: the outputs are transformers' own (issue 13)."""
    torch.manual_seed(5)
    hidden = torch.randn(1, 8, 64)
    ref = hf_blocks(micro_hf, hidden, 0, 4)
    old = micro_node.status["actors"]
    seen = len(micro_node.log_events())
    with micro_client.session(max_length=8, start=0, end=4) as session:
        first = session.step(hidden[:, :4])
        t0 = time.monotonic()
        os.kill(old[rank]["pid"], signal.SIGKILL)
        rest = session.step(hidden[:, 4:])
        answered = time.monotonic() - t0
    assert rel_err(torch.cat([first, rest], dim=1), ref) <= TOL
    wait_online_with_new_group(micro_node, old, t0 + RECOVERY)
    with micro_client.session(max_length=8, start=0, end=4) as session:
        out = torch.cat([session.step(hidden[:, :4]), session.step(hidden[:, 4:])], dim=1)
    assert rel_err(out, ref) <= TOL
    later = micro_node.log_events()[seen:]
    states = [e["state"] for e in later if e.get("event") == "state" and e.get("actor") == "supervisor"]
    assert states[:2] == ["JOINING", "ONLINE"], states
    died = [e for e in later if e.get("event") == "tensor-parallel rank died; restarting the group"]
    assert [e["actor"] for e in died] == [rank], died
    assert any(e.get("event") == "session recovered" for e in later)
    print(f"{rank}: the step after kill -9 answered in {answered:.1f} s")


def test_quantized_tensor_parallel_node(tmp_path, micro_hf):
    """--quant_type int8 with two ranks: each rank quantizes its shard; the node publishes int8 and serves
    outputs within test_quantize's bound of transformers', inference equal to its own forward."""
    from node.client.swarm import Client
    from tests.helpers.quantization import BOUND

    with NodeProcess(
        MICRO_LLAMA,
        tmp_path / "q",
        "--tensor_parallel_devices",
        "cpu",
        "cpu",
        "--quant_type",
        "int8",
        dht_prefix="micro-tp-int8",
    ) as node:
        with Client(node.maddrs, "micro-tp-int8") as client:
            assert client.spans(4)[0].info.quant_type == "int8"
            torch.manual_seed(3)
            hidden = torch.randn(1, 6, 64)
            out = client.forward(hidden, 0, 4)
            expected = hf_blocks(micro_hf, hidden, 0, 4)
            assert rel_err(out - hidden, expected - hidden) <= BOUND["int8"]
            with client.session(max_length=8, start=0, end=4) as session:
                steps = [session.step(hidden[:, :4]), session.step(hidden[:, 4:6])]
            assert rel_err(torch.cat(steps, 1), out) <= 1e-4
