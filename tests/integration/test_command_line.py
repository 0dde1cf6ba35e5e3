"""`python -m node.supervisor` with settings that cannot work: exit code 2 and a message naming the flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import MICRO_LLAMA, ROOT


def run_supervisor(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.supervisor", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_supervisor_exits_2_on_a_bad_flag():
    result = run_supervisor("--model", str(MICRO_LLAMA), "--num_handlers", "-3")
    assert result.returncode == 2 and "--num_handlers" in result.stderr


def test_supervisor_exits_2_when_the_model_cannot_serve_the_blocks(tmp_path):
    result = run_supervisor(
        "--model",
        str(MICRO_LLAMA),
        "--dht_prefix",
        "x",
        "--block_indices",
        "2:9",
        "--new_swarm",
        "--run_dir",
        str(tmp_path / "r"),
    )
    assert result.returncode == 2 and "--block_indices" in result.stderr


def test_supervisor_exits_2_for_a_local_model_without_prefix(tmp_path):
    result = run_supervisor("--model", str(MICRO_LLAMA), "--new_swarm", "--run_dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "--dht_prefix" in result.stderr


def test_supervisor_exits_2_for_a_missing_model(tmp_path):
    result = run_supervisor("--model", str(tmp_path / "nothing-here"), "--new_swarm", "--run_dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "--model" in result.stderr


def test_a_node_starts_the_petals_way_from_a_config_yml_in_its_working_directory(tmp_path):
    """Petals reads ./config.yml in configargparse's syntax: so does the node. A flag of Petals' own
    runtime in it is named in a warning at start; --use_auth_token takes no value; the console script
    petals-node is the same command."""
    from node.tools.launcher import NodeProcess

    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yml").write_text("# as a Petals operator writes it\nblock_indices = 0:2\nprefetch_batches: 2\n")
    with NodeProcess(MICRO_LLAMA, tmp_path / "node", "--use_auth_token", cwd=work) as node:
        assert node.status["blocks"] == [0, 2]
        events = node.log_events()
        assert any("config.yml" in e.get("event", "") for e in events)
        warned = [e for e in events if e.get("flag") == "--prefetch_batches"]
        assert warned and warned[0]["level"] == "warning" and "in Petals" in warned[0]["in_petals"]
    script = Path(sys.executable).parent / "petals-node"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: petals-node")
