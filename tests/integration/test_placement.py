"""Several nodes in one swarm on loopback: how many blocks, which ones, and moves (PROTOCOL 5.1-5.3).

A 6-block model; nodes with --num_blocks 3 (room for half of it). The checks run fast: short DHT
refreshes, balance checks every second on average, two consecutive checks before a move.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from node.client.generate import LocalHead, greedy_generate
from node.client.swarm import Client
from node.tools.launcher import NodeProcess
from tests.helpers.waiting import wait_until

PREFIX = "six"
FAST = (
    "--mean_block_selection_delay",
    "0.3",
    "--update_period",
    "1",
    "--mean_balance_check_period",
    "1",
    "--balance_checks",
    "2",
    "--drain_timeout",
    "5",
)
HALF = ("--num_blocks", "3", *FAST)


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    from node.tools.tinymodel import make_tiny_llama

    path = tmp_path_factory.mktemp("models") / "six-blocks"
    make_tiny_llama(str(path), hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, vocab_size=128, seed=3)
    return path


@pytest.fixture(scope="module")
def reference(six_blocks):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(six_blocks), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        expected = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    return ids, expected.tolist(), LocalHead(str(six_blocks))


def spans(client) -> set:
    return {(s.peer_id, s.start, s.end) for s in client.spans(6)}


def covered(client) -> bool:
    blocks = set()
    for _, start, end in spans(client):
        blocks.update(range(start, end))
    return blocks == set(range(6))


def generates(client, reference, timeout=60.0) -> None:
    """A generation through the swarm equals transformers; a failure while the swarm changes is
    retried (as a Petals client does) until the deadline, and a wrong answer fails at once."""
    ids, expected, head = reference
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert greedy_generate(client, head, ids, 6).tolist() == expected
            return
        except AssertionError:
            raise
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def node(model, base, name, *args, peers=None) -> NodeProcess:
    extra = ("--initial_peers", *peers) if peers else ()
    return NodeProcess(model, base / name, *args, *extra, dht_prefix=PREFIX)


def moves(node: NodeProcess) -> int:
    return node.status.get("moves", 0)


def test_half_nodes_cover_the_model_a_late_node_fills_the_gap_and_a_leaving_one_is_replaced(
    tmp_path, six_blocks, reference
):
    started = []
    try:
        a = node(six_blocks, tmp_path, "a", *HALF).start()
        started.append(a)
        assert a.status["blocks"] == [0, 3]  # an empty swarm: the first window
        b = node(six_blocks, tmp_path, "b", *HALF, peers=a.maddrs).start()
        started.append(b)
        assert b.status["blocks"] == [3, 6]  # the least-served blocks
        with Client(a.maddrs, PREFIX) as client:
            wait_until(lambda: covered(client), every=0.3, what="both spans")
            generates(client, reference)
            c = node(six_blocks, tmp_path, "c", *HALF, peers=a.maddrs).start()
            started.append(c)
            assert c.status["blocks"] == [0, 3]  # all blocks equally served: the first window
            wait_until(lambda: len(spans(client)) == 3, every=0.3, what="three spans")
            generates(client, reference)

            b.stop()  # blocks 3:6 lose their only server
            wait_until(lambda: covered(client), timeout=90, every=0.3, what="someone moves to 3:6")
            generates(client, reference)
            time.sleep(6)  # several more balance checks: nobody moves again
            assert sorted(n.status["blocks"] for n in (a, c)) == [[0, 3], [3, 6]]
            assert moves(a) + moves(c) == 1
            generates(client, reference)
    finally:
        for n in started:
            n.stop()


@pytest.mark.parametrize("how", ["load_then_switch", "drain_then_restart"])
def test_an_imbalance_moves_exactly_one_node_once_while_a_client_generates(tmp_path, six_blocks, reference, how):
    """Two movable nodes share 0:3 while a pinned node holds 3:6; the pinned node leaves, so 0:3 has
    three servers and 3:6 one: both movable nodes see it, exactly one moves, and only once. A client
    generates all along (through the full node when needed) and never gets a wrong token. With room
    for both ranges the mover loads the new blocks first; without (a margin that leaves no memory)
    it drains its sessions and restarts its runtime on the new blocks."""
    movable = HALF if how == "load_then_switch" else (*HALF, "--memory_margin", "0.9999999")
    started = []
    results = {"ok": 0, "retried": 0, "wrong": 0}
    stop = threading.Event()

    def generate_all_along(client):
        ids, expected, head = reference
        while not stop.is_set():
            try:
                tokens = greedy_generate(client, head, ids, 6).tolist()
            except Exception:
                results["retried"] += 1
                time.sleep(0.3)
                continue
            results["ok" if tokens == expected else "wrong"] += 1

    try:
        full = node(six_blocks, tmp_path, "full", "--block_indices", "0:6", *FAST).start()
        started.append(full)
        x = node(six_blocks, tmp_path, "x", *movable, peers=full.maddrs).start()
        started.append(x)
        pinned = node(six_blocks, tmp_path, "pinned", "--block_indices", "3:6", *FAST, peers=full.maddrs).start()
        started.append(pinned)
        with Client(full.maddrs, PREFIX) as client:
            wait_until(lambda: len(spans(client)) == 3, every=0.3, what="the pinned node")
            y = node(six_blocks, tmp_path, "y", *movable, peers=full.maddrs).start()
            started.append(y)
            assert x.status["blocks"] == y.status["blocks"] == [0, 3]
            worker = threading.Thread(target=generate_all_along, args=(client,), daemon=True)
            worker.start()
            pinned.stop()
            wait_until(lambda: moves(x) + moves(y) >= 1, timeout=90, every=0.3, what="one move")
            wait_until(
                lambda: all(n.status.get("state") == "online" for n in (x, y)),
                timeout=60,
                every=0.3,
                what="the move done",
            )
            time.sleep(8)  # several more balance checks: nobody moves again
            stop.set()
            worker.join(60)
            assert moves(x) + moves(y) == 1
            mover = x if moves(x) else y
            events = [
                json.loads(line)["event"] for line in mover.log_path.read_text().splitlines() if line.startswith("{")
            ]
            assert ("loading blocks before switching" in events) == (how == "load_then_switch")
            assert sorted(n.status["blocks"] for n in (x, y)) == [[0, 3], [3, 6]]
            assert results["ok"] > 0 and results["wrong"] == 0, results
            generates(client, reference)
    finally:
        stop.set()
        for n in started:
            n.stop()


def test_num_blocks_from_memory_is_logged(tmp_path, six_blocks):
    with node(six_blocks, tmp_path, "m", *FAST) as n:
        assert n.status["blocks"] == [0, 6]  # a tiny model fits whole in RAM
        events = [json.loads(line) for line in n.log_path.read_text().splitlines() if line.startswith("{")]
        chosen = [e for e in events if e.get("event") == "number of blocks chosen from memory"]
        assert chosen and chosen[0]["num_blocks"] == 6 and chosen[0]["source"] == "ram"
        assert chosen[0]["block"] > 0 and chosen[0]["cache"] > 0 and chosen[0]["memory"] > 0


def test_throughput_dry_run_measures_and_exits(tmp_path, six_blocks):
    import subprocess
    import sys

    from node.tools.launcher import ROOT

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.supervisor",
            "--model",
            str(six_blocks),
            "--dht_prefix",
            PREFIX,
            "--new_swarm",
            "--host_maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--torch_dtype",
            "float32",
            "--num_handlers",
            "1",
            "--throughput",
            "dry_run",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--network_bandwidth",
            "1000",
            "--log_format",
            "json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads([line for line in out.stdout.splitlines() if line.startswith('{"throughput"')][-1])
    assert figures["forward_rps"] > 0 and figures["inference_rps"] > 0
    assert figures["network_rps"] == pytest.approx(1000e6 / (64 * 16))
    expected = min(figures["forward_rps"] / ((6 + 1) / 2), figures["network_rps"])
    assert figures["throughput"] == pytest.approx(expected)
    cache = json.loads((tmp_path / "cache" / "throughput_v5.json").read_text())
    assert list(cache) == [f"model_{six_blocks}_device_CPU_dtype_float32"]


def test_measured_throughput_is_announced_with_strict_types(tmp_path, six_blocks):
    with node(six_blocks, tmp_path, "t", "--throughput", "auto", "--cache_dir", str(tmp_path / "cache"), *FAST) as n:
        with Client(n.maddrs, PREFIX) as client:
            infos = wait_until(lambda: client.servers(6)[0], every=0.3, what="records")
            info = infos[n.peer_id]
            assert isinstance(info.throughput, float) and info.throughput > 0
            for field in ("inference_rps", "forward_rps", "network_rps"):
                assert isinstance(getattr(info, field), float) and getattr(info, field) > 0
            assert info.network_rps == pytest.approx(100e6 / (64 * 16))  # no bandwidth given: 100 Mbit/s
