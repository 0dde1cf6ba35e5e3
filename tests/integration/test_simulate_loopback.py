"""The simulator against real nodes: the same servers join a swarm one after the other, on loopback
and in node.simulate, and choose the same blocks in the same order.

Each node joins once the one before it is ONLINE, so its choice depends only on the records of those
before it, which both swarms hold the same; throughputs are small integers, so the sums are exact
whatever the order. `--balance_quality 0` keeps the real nodes where they chose (moves are compared
on hand-made swarms in tests/unit/test_block_selection.py and tests/integration/test_placement.py).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from node.simulate.config import Config, Device
from node.simulate.simulation import Arrival, Simulation
from node.tools.launcher import NodeProcess

PREFIX = "simcheck"
# (blocks, throughput) of each server, in the order they join a 6-block model
SERVERS = [(2, 1.0), (3, 2.0), (2, 1.0), (4, 1.0), (1, 3.0), (2, 2.0)]
FAST = ("--mean_block_selection_delay", "0.3", "--update_period", "2", "--balance_quality", "0")


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    from node.tools.tinymodel import make_tiny_llama

    path = tmp_path_factory.mktemp("models") / "six-blocks"
    make_tiny_llama(str(path), hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, vocab_size=128, seed=3)
    return path


def simulated() -> list[list[int]]:
    config = replace(Config(), total_blocks=6, servers=len(SERVERS), sessions_per_hour=0.0, hours=1.0, warmup_h=0.5)
    sim = Simulation(config, "node", 0)
    device = Device("any", 80, "cuda", 1000, 1.0)
    for k, (count, throughput) in enumerate(SERVERS):
        arrival = Arrival(
            at=60.0 * k, peer=f"Qm{k}", device=device, network_rps=1e3, relay=False, node=True,
            stay=1e9, crash=False, count=count, throughput=throughput,
        )  # fmt: skip
        sim.events.at(arrival.at, sim.arrive, arrival)
    sim.events.run_until(60.0 * len(SERVERS))
    return [list(server.held[0]) for server in sim.servers]


def test_real_nodes_choose_the_blocks_the_simulator_chooses(tmp_path, six_blocks):
    expected = simulated()
    started, chosen = [], []
    try:
        for k, (count, throughput) in enumerate(SERVERS):
            peers = ("--initial_peers", *started[0].maddrs) if started else ()
            args = ("--num_blocks", str(count), "--throughput", str(throughput), *FAST, *peers)
            n = NodeProcess(six_blocks, tmp_path / f"n{k}", *args, dht_prefix=PREFIX).start()
            started.append(n)
            chosen.append(n.status["blocks"])
    finally:
        for n in started:
            n.stop()
    assert chosen == expected
