"""The hostile-peers attacks of tests/integration/test_hostile_peers.py against a Petals server: figures for
the Petals column of docs/reliability.md's table, not a test (nothing about the node is asserted, so it is
no longer collected by pytest).

    .venv/bin/python -m tests.petals_attacks [--petals_python PYTHON] [--attack NAME ...]

Each attack meets a fresh server (the effects of one, such as a server still building a string of 2**62
uids, must not be counted against the next) serving 4 blocks of a model of micro-llama's shape (hidden 64,
GQA) without its llama3 rope scaling, which the transformers that Petals 2.2 pins cannot read, while an
honest client keeps using it. Prints one `reliability: attack NAME (petals) ...` line per attack, as the
node's test does. One attack grows a Petals server by gigabytes: run it on a machine that can spare them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import psutil


def main(argv=None) -> int:
    from node.bench_petals import start_petals_server, stop_group
    from node.client.swarm import Client
    from node.tools.tinymodel import make_tiny_llama
    from tests.helpers.petals import PETALS_PYTHON, why_missing
    from tests.helpers.rpc import Caller
    from tests.integration.test_hostile_peers import ATTACKS, attack_under_load, bounds_of

    parser = argparse.ArgumentParser(prog="python -m tests.petals_attacks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--petals_python", default=PETALS_PYTHON, help="a Python with petals installed")
    parser.add_argument("--attack", action="append", choices=sorted(ATTACKS), help="only these (default: all)")
    args = parser.parse_args(argv)
    if not args.petals_python:
        print(why_missing(), file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="petals-attacks-"))
    model = work / "tiny-llama"
    make_tiny_llama(str(model), hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=128, seed=0)
    for name in args.attack or list(ATTACKS):
        server, maddrs = start_petals_server(
            args.petals_python, model, 4, work / f"petals-{name}.log", prefix="micro-llama"
        )
        try:
            peer = maddrs[0].split("/p2p/")[-1]

            def pids():
                try:
                    root = psutil.Process(server.pid)
                    return [root.pid] + [p.pid for p in root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    return []

            target = type("Target", (), {"peer_id": peer})()
            with Client(maddrs, "micro-llama") as honest, Client(maddrs, "micro-llama") as attacker_client:
                bounds = bounds_of(honest)
                try:
                    attack_under_load(name, Caller(attacker_client, target), honest, pids, bounds, f"{name} (petals)")
                except Exception as e:
                    print(f"reliability: attack {name} (petals) raised {type(e).__name__}: {str(e)[:200]}")
                if server.poll() is not None:
                    print(f"reliability: attack {name} (petals): the server exited with {server.returncode}")
        finally:
            stop_group(server)
    print(f"logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
