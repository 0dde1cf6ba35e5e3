"""Shared fixtures: tiny models made here with a fixed seed, and whole nodes started as a user would.

A node is started with `python -m node.supervisor ...` on loopback in a private swarm; `NodeProcess`
waits until RUN_DIR/status.json says ONLINE and always stops what it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
# A copy of ../shared (the micro models and the recorded Petals traffic) lives in tests/data so that a
# clean clone tests itself; NODE_SHARED_DIR points the tests at another copy.
SHARED = Path(os.environ.get("NODE_SHARED_DIR", ROOT / "tests" / "data"))
MICRO_LLAMA = SHARED / "models" / "micro-llama"
VECTORS = SHARED / "vectors"


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class NodeProcess:
    """One node: a supervisor process and everything it spawns."""

    def __init__(self, model: str, run_dir: Path, *args: str, dht_prefix: str = "micro-llama", log_path: Optional[Path] = None):
        self.run_dir = Path(run_dir)
        self.argv = [
            sys.executable, "-m", "node.supervisor",
            "--model", str(model),
            "--dht_prefix", dht_prefix,
            "--torch_dtype", "float32",
            "--host_maddrs", "/ip4/127.0.0.1/tcp/0",
            "--run_dir", str(self.run_dir),
            "--throughput", "1.0",
            "--num_handlers", "1",
            "--log_format", "json",
        ]
        self.argv += list(args)
        if not any(a in ("--initial_peers", "--new_swarm") for a in args):
            self.argv.append("--new_swarm")
        self.dht_prefix = dht_prefix
        self.log_path = log_path or (self.run_dir.parent / f"{self.run_dir.name}.log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 90) -> "NodeProcess":
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_state("online", timeout)
        return self

    @property
    def status(self) -> dict:
        try:
            return json.loads((self.run_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_state(self, state: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status
            if status.get("state") == state and status.get("supervisor_pid") == self.proc.pid:
                return status
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"node not {state} after {timeout} s; status {self.status}; log:\n{self.log_tail()}")

    def wait_ready(self, name: str, old_pid: Optional[int] = None, timeout: float = 30) -> int:
        """Wait until actor `name` is ready again with a new pid; return that pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            actor = self.status.get("actors", {}).get(name, {})
            if actor.get("ready") and actor.get("pid") and actor.get("pid") != old_pid:
                return actor["pid"]
            time.sleep(0.05)
        raise TimeoutError(f"{name} not ready again after {timeout} s: {self.status}")

    @property
    def maddrs(self) -> list[str]:
        return self.status["maddrs"]

    @property
    def peer_id(self) -> str:
        return self.status["peer_id"]

    def actor_pid(self, name: str) -> int:
        return self.status["actors"][name]["pid"]

    def all_pids(self) -> list[int]:
        """The supervisor and every descendant (p2pd included)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [p.pid for p in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        pids = self.all_pids()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            for pid in pids:  # never leave anything behind, even when the test failed
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from node.tinymodel import make_tiny_llama

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
    from node.client import Client

    client = Client(micro_node.maddrs, "micro-llama")
    yield client
    client.close()


@pytest.fixture(scope="session")
def micro_hf():
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MICRO_LLAMA), dtype=torch.float32)
    return model.eval()


def hf_blocks(model, hidden, start: int, end: int, prompts=None):
    """Reference: transformers' layers [start, end) applied to `hidden` (deep prompts added before each)."""
    import torch

    captured = {}
    hooks = []
    layers = model.model.layers

    def replace_input(module, args, kwargs):
        return (hidden,) + tuple(args[1:]), kwargs

    def add_prompt(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            p = prompts[i - start]
            h = torch.cat([h[:, : p.shape[-2]] + p, h[:, p.shape[-2] :]], dim=1)
            if args:
                return (h,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs

        return hook

    hooks.append(layers[start].register_forward_pre_hook(replace_input, with_kwargs=True))
    if prompts is not None:
        for i in range(start, end):
            hooks.append(layers[i].register_forward_pre_hook(add_prompt(i), with_kwargs=True))
    hooks.append(layers[end - 1].register_forward_hook(lambda m, a, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out)))
    try:
        model(inputs_embeds=torch.zeros_like(hidden), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured["out"]


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
