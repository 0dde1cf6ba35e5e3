"""Shared fixtures: tiny models made here with a fixed seed, and whole nodes started as a user would.
Helpers that are not fixtures live in tests/helpers/.

A node is started with `python -m node.supervisor ...` on loopback in a private swarm; `NodeProcess`
waits until RUN_DIR/status.json says ONLINE and always stops what it started.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.tools.launcher import NodeProcess
from tests.helpers.paths import MICRO_LLAMA

pytest_plugins = ["tests.helpers.fake_hub", "tests.helpers.adapters"]  # their fixtures: hub, models; adapters


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    # NODE_CHECK_DEVICE=cpu runs the GPU check's tests on the CPU: a check of their code, not of CUDA
    if has_gpu() or os.environ.get("NODE_CHECK_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


PETALS_OUTCOMES: dict[str, str] = {}  # nodeid -> outcome of each `petals` test, for the closing line


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With NODE_REQUIRE_PETALS=1 (.ci/run), a `petals` test that skipped fails: CI must meet a real Petals."""
    outcome = yield
    report = outcome.get_result()
    if "petals" not in item.keywords:
        return
    if report.skipped and os.environ.get("NODE_REQUIRE_PETALS") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"NODE_REQUIRE_PETALS=1 and this Petals test skipped: {reason}"
    if report.when == "call" or report.outcome != "passed":
        PETALS_OUTCOMES[item.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    """One line saying whether the node met a real Petals in this run, and which one."""
    if not PETALS_OUTCOMES:
        return
    from tests.helpers.petals import PETALS_PYTHON, petals_version

    counts = {o: list(PETALS_OUTCOMES.values()).count(o) for o in ("passed", "failed", "skipped")}
    against = f"Petals {'.'.join(map(str, petals_version()))} at {PETALS_PYTHON}" if PETALS_PYTHON else "no Petals"
    terminalreporter.write_line(
        f"real Petals: {len(PETALS_OUTCOMES)} tests against {against} "
        f"(passed {counts['passed']}, failed {counts['failed']}, skipped {counts['skipped']})"
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from node.tools.tinymodel import make_tiny_llama

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny_llama(str(path), hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=128, seed=0)
    return path


@pytest.fixture(scope="session")
def micro_node(tmp_path_factory):
    """A node serving all 4 blocks of micro-llama, shared by tests that do not disturb it."""
    node = NodeProcess(MICRO_LLAMA, tmp_path_factory.mktemp("nodes") / "micro", "--num_handlers", "2")
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def micro_client(micro_node):
    from node.client.swarm import Client

    client = Client(micro_node.maddrs, "micro-llama")
    yield client
    client.close()


@pytest.fixture(scope="session")
def micro_hf():
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MICRO_LLAMA), dtype=torch.float32)
    return model.eval()
