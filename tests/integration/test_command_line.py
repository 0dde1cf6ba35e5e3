"""`python -m node.supervisor` with settings that cannot work: exit code 2 and a message naming the flag."""

from __future__ import annotations

import subprocess
import sys

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
