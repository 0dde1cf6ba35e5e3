"""python -m node.simulate: run each rule with each seed, print the table and the chart, and write
them (report.md, throughput.png, throughput.txt, and series.json for node.simulate.panels) under --out."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from pathlib import Path

from node.simulate import plot, report
from node.simulate.config import Config, parse
from node.simulate.simulation import Simulation


def run_one(job: tuple[Config, str, int]):
    config, rule, seed = job
    return Simulation(config, rule, seed).run()


def run_all(config: Config) -> list:
    jobs = [(config, rule, seed) for rule in config.rules for seed in range(config.seeds)]
    if config.jobs == 1 or len(jobs) == 1:
        return [run_one(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(min(config.jobs, len(jobs))) as pool:
        return pool.map(run_one, jobs)


def describe(config: Config) -> str:
    devices = ", ".join(f"{d.name} {d.share:g}" for d in config.devices)
    return (
        f"{config.name}: {config.servers} servers, {config.hours:g} h ({config.warmup_h:g} h warm-up left out), "
        f"{config.total_blocks} blocks; mean stay {config.mean_lifetime_h:g} h ({config.lifetime}), "
        f"{100 * config.crash_share:g}% crash; devices {devices}; {100 * config.relay_share:g}% behind relays; "
        f"{config.sessions_per_hour:g} sessions/h of {config.session_min:g} min; seeds 0..{config.seeds - 1}"
    )


def main(argv=None) -> int:
    config = parse(argv)
    started = time.perf_counter()
    results = run_all(config)
    wall = time.perf_counter() - started
    first = {r.rule: (r.times, r.fractions) for r in results if r.seed == 0}
    table = report.table(results)
    chart = plot.text(first)
    heading = describe(config)
    print(heading, "\n", table, "\n\n", chart, f"\n\n{len(results)} runs in {wall:.0f} s", sep="")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(f"{heading}\n\n{table}\n")
    (out / "throughput.txt").write_text(chart + "\n")
    (out / "throughput.png").write_bytes(plot.png(first))
    (out / "series.json").write_text(json.dumps({"name": config.name, "series": first}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
