"""Start a whole node as a user would (`python -m node.supervisor ...`) and wait until it serves.

Used by the demo, the benchmark and the tests: the node runs on loopback, in a private swarm unless
told otherwise, and `stop()` never leaves a process behind.
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

from node.startup import stop_with_parent

ROOT = Path(__file__).resolve().parents[2]  # the checkout: node/tools/launcher.py


class NodeProcess:
    """One node: a supervisor process and everything it spawns."""

    def __init__(
        self,
        model: str,
        run_dir: Path,
        *args: str,
        dht_prefix: str = "micro-llama",
        log_path: Optional[Path] = None,
        env: Optional[dict] = None,
        root: Optional[Path] = None,
        cwd: Optional[Path] = None,
    ):
        self.root = Path(root or ROOT)  # the checkout to run (a test may run a copy it then changes)
        self.cwd = Path(cwd or self.root)  # where it runs: its ./config.yml is read, as Petals reads one
        self.run_dir = Path(run_dir)
        self.env = dict(env or {})  # added to the environment of the node (e.g. HF_ENDPOINT)
        self.argv = [
            sys.executable,
            "-m",
            "node.supervisor",
            "--model",
            str(model),
            "--dht_prefix",
            dht_prefix,
            "--torch_dtype",
            "float32",
            # stated, not left to the machine: on a GPU host the defaults are cuda and nf4, which the tests'
            # float32 tolerances and the benchmark's unquantized baseline do not expect (args may override)
            "--device",
            "cpu",
            "--quant_type",
            "none",
            "--host_maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--run_dir",
            str(self.run_dir),
            "--throughput",
            "1.0",
            "--num_handlers",
            "1",
            "--log_format",
            "json",
            # tests close their sessions before they stop a node; a test of the drain sets its own grace
            "--shutdown_grace",
            "10",
        ]
        self.argv += list(args)
        if not any(a in ("--initial_peers", "--new_swarm") for a in args):
            self.argv.append("--new_swarm")
        self.dht_prefix = dht_prefix
        self.log_path = log_path or (self.run_dir.parent / f"{self.run_dir.name}.log")
        self.proc: Optional[subprocess.Popen] = None

    def launch(self) -> "NodeProcess":
        """Start the supervisor without waiting (several nodes starting together)."""
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.root), self.env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=stop_with_parent,  # a node started for a test, demo or benchmark ends with its owner
        )
        return self

    def start(self, timeout: float = 90) -> "NodeProcess":
        self.launch()
        try:
            self.wait_state("online", timeout)
        except BaseException:
            self.stop()
            raise
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

    def log_events(self) -> list[dict]:
        """The node's log so far, one dict per JSON event line (other lines skipped)."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events

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
