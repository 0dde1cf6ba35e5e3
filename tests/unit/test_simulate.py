"""The swarm simulator (node/simulate) on small swarms, with fixed seeds; and the rule it runs
(node/supervisor/block_selection.py) against Petals' own functions on thousands of random swarms."""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import replace

import pytest

from node.simulate import plot, report
from node.simulate.__main__ import main
from node.simulate.config import Config, Device, parse
from node.simulate.simulation import Arrival, Simulation, blocks_and_room
from node.supervisor import block_selection
from protocol.dht_records import ServerInfo, ServerState, compute_spans
from tests.helpers.petals import PETALS_PYTHON, why_missing

GPU = Device("gpu", 24, "cuda", 1500, 1.0)
# 16 blocks of 4 GB: a 24 GB GPU holds 5 of them
SMALL = Config(
    total_blocks=16,
    block_bytes=4e9,
    devices=(GPU,),
    servers=12,
    hours=2.0,
    warmup_h=0.5,
    ramp_min=2.0,
    sessions_per_hour=200.0,
    seeds=1,
    jobs=1,
)
STEADY = replace(SMALL, mean_lifetime_h=1e6)  # nobody leaves


def test_a_small_gpu_holds_the_blocks_the_node_would_take():
    count, room = blocks_and_room(SMALL, GPU)
    assert count == 5 and 0 < room < 4e9


def test_a_swarm_without_churn_covers_the_model_and_nobody_moves():
    for rule in ("node", "petals"):
        result = Simulation(STEADY, rule, seed=1).run()
        assert result.uncovered == 0.0, rule
        assert min(result.fractions) > 0.5, rule
        assert result.sessions > 0 and result.refused == 0 and sum(result.broken.values()) == 0, rule


def test_a_run_repeats_with_its_seed():
    config = replace(SMALL, servers=6, mean_lifetime_h=0.5)
    one, two = Simulation(config, "mixed", 3).run(), Simulation(config, "mixed", 3).run()
    assert (one.fractions, one.moves, one.broken) == (two.fractions, two.moves, two.broken)


def test_a_server_alone_covers_the_whole_model_when_it_holds_it():
    config = replace(STEADY, servers=1, devices=(Device("big", 80, "cuda", 1500, 1.0),), total_blocks=8)
    for rule in ("node", "petals"):
        result = Simulation(config, rule, seed=0).run()
        assert result.uncovered == 0.0 and min(result.fractions) == pytest.approx(1.0), rule


def alone(config: Config, rule: str, stay: float, crash: bool) -> Simulation:
    """A swarm of one server, QmA, that arrives at once and stays `stay` seconds, then crashes or leaves."""
    sim = Simulation(config, rule, 0)
    arrival = Arrival(
        at=0.0, peer="QmA", device=GPU, network_rps=1e3, relay=False, node=rule == "node", stay=stay, crash=crash
    )
    sim.events.at(0.0, sim.arrive, arrival)
    return sim


def test_a_crashed_servers_record_lingers_until_it_expires():
    config = replace(STEADY, servers=1, sessions_per_hour=0.0)
    sim = alone(config, "node", stay=1000.0, crash=True)
    sim.events.run_until(999.0)
    assert sim.dht.view.spans["QmA"].info.state == ServerState.ONLINE
    announced = sim.servers[0].announced_at
    sim.events.run_until(1000.5)  # crashed: nothing serves, the record stays
    assert not sim.servers[0].alive and sim.truth.uncovered()
    assert "QmA" in sim.dht.view.spans
    last_refresh = announced + (1000.0 - announced) // config.update_period_s * config.update_period_s
    sim.events.run_until(last_refresh + config.expiration - 1)
    assert "QmA" in sim.dht.view.spans
    sim.events.run_until(last_refresh + config.expiration + 1)
    assert "QmA" not in sim.dht.view.spans and sim.dht.view.throughputs() == [0.0] * 16


def test_the_what_if_drops_a_crashed_servers_record_sooner():
    config = replace(STEADY, servers=1, sessions_per_hour=0.0, dead_after_s=30.0)
    sim = alone(config, "node", stay=1000.0, crash=True)
    sim.events.run_until(1029.0)
    assert "QmA" in sim.dht.view.spans
    sim.events.run_until(1031.0)
    assert "QmA" not in sim.dht.view.spans


def test_a_graceful_leave_is_offline_at_once():
    config = replace(STEADY, servers=1, sessions_per_hour=0.0)
    sim = alone(config, "petals", stay=500.0, crash=False)
    sim.events.run_until(501.0)
    assert "QmA" not in sim.dht.view.spans and ("QmA" in sim.dht.view.ranges)


def test_in_a_steady_swarm_the_node_moves_no_more_than_petals():
    config = replace(SMALL, servers=8, mean_lifetime_h=1.0, crash_share=0.5, hours=3.0)
    node = sum(Simulation(config, "node", seed).run().moves for seed in range(3))
    petals = sum(Simulation(config, "petals", seed).run().moves for seed in range(3))
    assert node <= petals


def test_the_node_drains_sessions_where_petals_breaks_them():
    config = replace(SMALL, mean_lifetime_h=0.5, crash_share=0.0, sessions_per_hour=600.0)
    node, petals = Simulation(config, "node", 0).run(), Simulation(config, "petals", 0).run()
    assert node.broken["leave"] < petals.broken["leave"]


def test_the_report_has_a_row_per_figure_and_a_column_per_rule(tmp_path):
    config = replace(SMALL, servers=4, hours=1.0, warmup_h=0.25)
    results = [Simulation(config, rule, seed).run() for rule in ("node", "petals") for seed in (0, 1)]
    table = report.table(results)
    assert table.splitlines()[0] == "| figure | node | petals | node - petals (paired) |"
    assert "| throughput mean |" in table and "±" in table
    series = {r.rule: (r.times, r.fractions) for r in results if r.seed == 0}
    image = plot.png(series)
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) < 100_000
    assert "n node, p petals" in plot.text(series)


def test_the_command_writes_the_report_the_chart_and_the_png(tmp_path, capsys):
    argv = ["--servers", "4", "--total_blocks", "16", "--block_bytes", "4e9", "--device", "gpu:24:cuda:1500:1"]
    argv += ["--hours", "1", "--warmup_h", "0.25", "--seeds", "1", "--jobs", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "| figure | node | petals | mixed | node - petals (paired) |" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "throughput.txt", "throughput.png", "series.json"}


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--servers", "0"], "--servers"),
        (["--crash_share", "1.5"], "--crash_share"),
        (["--lifetime", "forever"], "--lifetime"),
        (["--device", "gpu:24:tpu:1:1"], "cuda or cpu"),
        (["--device", "gpu:24"], "NAME:MEMORY_GB"),
        (["--warmup_h", "30"], "--warmup_h"),
        (["--network_mbps", "100", "10"], "--network_mbps"),
        (["--hours", "lots"], "--hours"),
    ],
)
def test_bad_inputs_are_named(argv, named, capsys):
    with pytest.raises(SystemExit) as exit:
        parse(argv)
    assert exit.value.code == 2
    assert named in capsys.readouterr().err


def test_a_device_too_small_for_one_block_is_named(capsys):
    with pytest.raises(SystemExit):
        parse(["--device", "tiny:1:cuda:100:1"])
    assert "tiny" in capsys.readouterr().err


def test_the_shortcut_never_changes_the_answer():
    """cannot_gain skips the search only where the search would say no: checked against the search."""
    rng = random.Random(5)
    skipped = 0
    for _ in range(3000):
        total, infos = random_swarm(rng)
        spans = compute_spans({b: infos[b] for b in range(total)}, min_state=ServerState.JOINING)
        if not spans:
            continue
        throughputs = block_selection.block_throughputs(spans, total)
        quality = rng.choice([0.5, 0.75, 0.9, 1.0])
        if block_selection.cannot_gain(throughputs, quality):
            skipped += 1
            for peer in spans:
                assert not search_says_move(peer, spans, total, quality)
    assert skipped > 50


def search_says_move(peer, spans, total, quality) -> bool:
    original = block_selection.cannot_gain
    block_selection.cannot_gain = lambda *_: False
    try:
        return any(block_selection.should_move(peer, spans, total, quality, random.Random(s)) for s in range(3))
    finally:
        block_selection.cannot_gain = original


# --- against Petals' own functions -------------------------------------------------------------

B58 = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def random_swarm(rng: random.Random):
    """A random DHT lookup: {block: {peer: ServerInfo}}, each server on a contiguous range."""
    total = rng.randint(2, 24)
    infos = {b: {} for b in range(total)}
    for _ in range(rng.randint(0, 14)):
        peer = "Qm" + "".join(rng.choice(B58) for _ in range(10))
        start = rng.randrange(total)
        end = rng.randint(start + 1, total)
        throughput = rng.choice([float(rng.randint(1, 4)), rng.uniform(0.1, 10.0), rng.choice([0.5, 0.25])])
        state = rng.choices(list(ServerState), [1, 2, 6])[0]
        info = ServerInfo(state=state, throughput=throughput, start_block=start, end_block=end)
        for block in range(start, end):
            infos[block][peer] = info
    return total, infos


PETALS_SIDE = """
import json, sys
import numpy as np
from hivemind import PeerID
from petals.data_structures import RemoteModuleInfo, ServerInfo, ServerState
from petals.server.block_selection import choose_best_blocks, should_choose_other_blocks

answers = []
for case in json.load(sys.stdin):
    modules = [
        RemoteModuleInfo(
            uid=f"model.{block}",
            servers={
                PeerID.from_base58(peer): ServerInfo(
                    state=ServerState(state), throughput=throughput, start_block=start, end_block=end
                )
                for peer, (state, throughput, start, end) in case["blocks"][block].items()
            },
        )
        for block in range(case["total"])
    ]
    chosen = choose_best_blocks(case["num_blocks"], modules)
    moves = []
    if case["local"] is not None:
        for seed in range(case["seeds"]):
            np.random.seed(seed)
            moves.append(bool(should_choose_other_blocks(PeerID.from_base58(case["local"]), modules, case["quality"])))
    answers.append({"start": chosen[0], "moves": moves})
print(json.dumps(answers))
"""


@pytest.mark.petals
@pytest.mark.skipif(not PETALS_PYTHON, reason=why_missing())
def test_block_selection_agrees_with_petals_own_functions_on_random_swarms():
    """choose_best_blocks is deterministic and is compared on every swarm. should_choose_other_blocks
    shuffles the servers (Petals with numpy's global generator, the node with its own), and the
    shuffles cannot be made the same; it is compared where the answer does not depend on the order:
    where each side gives one answer for several seeds of its own generator (the early returns, and
    searches that end the same whatever the order). Both sides must agree on every such swarm, and
    those must be most of them."""
    rng = random.Random(23)
    cases, ours = [], []
    seeds = 4
    while len(cases) < 3000:
        total, infos = random_swarm(rng)
        num_blocks = rng.randint(1, total)
        spans = compute_spans(infos, min_state=ServerState.JOINING)
        local = rng.choice(sorted(spans)) if spans else None
        quality = rng.choice([0.5, 0.75, 0.75, 0.9, 1.0, 1.5])
        moves = []
        if local is not None:
            moves = [
                block_selection.should_choose_other_blocks(local, infos, total, quality, random.Random(s))
                for s in range(seeds)
            ]
        ours.append({"start": block_selection.choose_best_blocks(num_blocks, infos, total)[0], "moves": moves})
        blocks = [
            {p: [int(i.state), i.throughput, i.start_block, i.end_block] for p, i in infos[b].items()}
            for b in range(total)
        ]
        cases.append(dict(total=total, blocks=blocks, num_blocks=num_blocks, local=local, quality=quality, seeds=seeds))
    done = subprocess.run(
        [PETALS_PYTHON, "-c", PETALS_SIDE], input=json.dumps(cases), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert [t["start"] for t in theirs] == [o["start"] for o in ours]
    compared = moving = 0
    for case, mine, petals in zip(cases, ours, theirs):
        if len(set(mine["moves"])) == 1 and len(set(petals["moves"])) == 1:
            compared += 1
            moving += mine["moves"][0]
            assert mine["moves"][0] == petals["moves"][0], case
    with_local = sum(1 for c in cases if c["local"] is not None)
    print(f"compared {compared} of {with_local}, {moving} moving")
    assert compared > 0.9 * with_local and moving > 100, (compared, with_local, moving)
