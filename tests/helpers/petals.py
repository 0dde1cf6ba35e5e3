"""A real Petals for the tests: which interpreter, which model it can read, and how a Petals server starts.

The interpreter is $PETALS_PYTHON when set (any Petals, e.g. a HEAD build), else the Petals 2.2.0.post1
environment that `python3 -m node.tools.petals_env` builds (.ci/install builds it). Tests that need it
carry the `petals` marker: without one they skip saying why, and with NODE_REQUIRE_PETALS=1 (.ci/run sets
it) a skipped `petals` test fails the run instead (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

from node.bench_petals import stop_group
from node.tools import petals_env
from tests.helpers.paths import MICRO_LLAMA


def petals_python() -> Optional[str]:
    if os.environ.get("PETALS_PYTHON"):
        return os.environ["PETALS_PYTHON"]
    built = petals_env.built()
    return str(built) if built else None


def why_missing() -> str:
    note = petals_env.failure_note()
    if note.exists():
        return (
            f"no Petals to test against: the Petals 2.2.0 environment cannot be built here: {note.read_text()[-600:]}"
        )
    return (
        "no Petals to test against: set PETALS_PYTHON to a Python with Petals installed, or build Petals 2.2.0 "
        f"with `python -m node.tools.petals_env` (it goes to {petals_env.location()}; .ci/install builds it)"
    )


PETALS_PYTHON = petals_python()


def petals_version() -> tuple[int, ...]:
    """The Petals release under PETALS_PYTHON, e.g. (2, 2, 0) for 2.2.0.post1 and (2, 3, 0) for 2.3.0.dev2."""
    done = subprocess.run(
        [PETALS_PYTHON, "-c", "import importlib.metadata as m; print(m.version('petals'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return tuple(int(part) for part in re.findall(r"\d+", done.stdout)[:3])


# Petals 2.2.0's client deadlocks when the cyclic garbage collector happens to run in its event loop's thread
# and finalizes an inference session there (its __del__ waits on that same loop): seen in about one run in
# four of node.bench_petals on a loaded machine. A short client script does without that collector.
NO_CYCLIC_GC = "import gc; gc.disable()\n"


def client_argv(script: str, *args: str) -> list[str]:
    """The command that runs a Petals client `script` (a string) under PETALS_PYTHON with `args`."""
    return [PETALS_PYTHON, "-c", NO_CYCLIC_GC + script, *args]


def petals_llama(where: Path) -> Path:
    """micro-llama as every Petals release can read it: the same weights, without the llama3 rope scaling
    that transformers 4.34 (Petals 2.2.0's) cannot parse. Nodes, Petals and transformers all load this copy."""
    target = where / "micro-llama-petals"
    if not target.exists():
        shutil.copytree(MICRO_LLAMA, target)
        config = json.loads((target / "config.json").read_text())
        config.pop("rope_scaling", None)
        (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def start_petals_server(model: Path, log: Path, peers: Optional[list[str]], *flags: str):
    """`python -m petals.cli.run_server` on loopback, CPU, float32, joined to `peers` (None: a new swarm);
    returns (the process, the multiaddrs it announced) once it logged "Started". Stop it with stop_group
    (SIGINT to its process group: its p2pd is in it)."""
    swarm = ["--initial_peers", *peers] if peers is not None else ["--new_swarm"]
    server = subprocess.Popen(
        [PETALS_PYTHON, "-m", "petals.cli.run_server", str(model), "--dht_prefix", "micro-llama"]
        + ["--torch_dtype", "float32", "--device", "cpu", "--throughput", "1"]
        + ["--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--num_handlers", "2", *swarm, *flags],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while "Started" not in log.read_text(errors="replace"):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_group(server)
            raise AssertionError("the Petals server did not start:\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    found = re.search(r"Running a server on (\[.*?\])", log.read_text(errors="replace"))
    maddrs = json.loads(found.group(1).replace("'", '"')) if found else []
    return server, maddrs
