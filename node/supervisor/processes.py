"""The supervisor's process table: how actors are started, watched and stopped, and when to give up.

Restart intensity follows Erlang/OTP: more than `max_restarts` restarts within `window` seconds
means something is wrong that restarting will not fix, so the whole node exits and lets systemd
or supervisord decide.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from node.startup import SUPERVISOR_PID_ENV
from protocol.messages import ActorStats
from protocol.plan import TP_STORE_ENV

# the rendezvous file of the runtimes' tensor-parallel group, new for each incarnation
# (node/runtime/tensor_parallel/group.py)
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(**extra: str) -> dict:
    """Our environment plus `extra`, with this project importable (`python -m procs.runtime` from anywhere)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    return env


@dataclass(frozen=True)
class ActorSpec:
    name: str  # also its control-plane identity: "runtime.0", "frontend.3", ...
    module: str  # started as `python -m <module> RUN_DIR NAME`


@dataclass
class ActorProcess:
    spec: ActorSpec
    popen: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    ready: bool = False
    was_ready: bool = False  # ready at least once: its next Ready is a replacement
    stats: Optional[ActorStats] = None  # from its last heartbeat
    restarts: int = 0
    consecutive_failures: int = 0
    respawn_at: Optional[float] = None  # set while waiting out a backoff
    load_ordered: bool = False  # runtime only: LoadBlocks was sent to this process
    reloading: bool = False  # replaced by a reload (node/supervisor/reload.py) until its successor is ready
    code: str = ""  # the code version its process reported when ready (node/code_version.py)
    env: dict = field(default_factory=dict)  # added to its environment at each spawn

    def stats_as(self, kind: type):
        """Its latest stats, or the zeros of `kind` before its first heartbeat."""
        return self.stats if isinstance(self.stats, kind) else kind()

    @property
    def pid(self) -> Optional[int]:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self, run_dir: str) -> None:
        env = child_env(**{SUPERVISOR_PID_ENV: str(os.getpid())}, **self.env)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", self.spec.module, run_dir, self.spec.name],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C goes to the supervisor alone
        )
        now = time.monotonic()
        self.started_at = now
        self.last_heartbeat = now
        self.ready = False
        self.respawn_at = None
        self.load_ordered = False

    def kill(self) -> None:
        if self.running:
            try:
                self.popen.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def describe_exit(self) -> str:
        code = self.popen.returncode if self.popen else None
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"


def actor_specs(num_handlers: int, tp_world: int = 1) -> list[ActorSpec]:
    """The node's actors: with tensor parallelism one runtime per device (runtime.0 leads)."""
    specs = [
        ActorSpec("announcer", "procs.announcer"),
        ActorSpec("allocator", "procs.allocator"),
        ActorSpec("runtime.0", "procs.runtime"),
    ]
    specs += [ActorSpec(f"runtime.{rank}", "procs.runtime_rank") for rank in range(1, tp_world)]
    specs += [ActorSpec(f"frontend.{i}", "procs.frontend") for i in range(num_handlers)]
    specs.append(ActorSpec("keeper", "procs.keeper"))  # holds the inference streams that frontends serve
    return specs


def start_actors(num_handlers: int, tp_world: int, run_dir: str) -> dict[str, ActorProcess]:
    """Start every actor at once: each imports its libraries (seconds of CPU for torch) while the
    supervisor resolves the model and starts p2pd, then waits for RUN_DIR/plan.json."""
    actors = {spec.name: ActorProcess(spec) for spec in actor_specs(num_handlers, tp_world)}
    new_group_store(actors, run_dir, 0)
    for actor in actors.values():
        actor.spawn(run_dir)
    return actors


def new_group_store(actors: dict[str, ActorProcess], run_dir: str, generation: int) -> None:
    """Each incarnation of a tensor-parallel group meets at a store of its own
    (node/runtime/tensor_parallel/group.py)."""
    for name in os.listdir(run_dir):
        if name.startswith("tp-store."):
            try:
                os.remove(os.path.join(run_dir, name))
            except OSError:
                pass
    for name, actor in actors.items():
        if name.startswith("runtime."):
            actor.env[TP_STORE_ENV] = os.path.join(run_dir, f"tp-store.{generation}")


class RestartIntensity:
    def __init__(self, max_restarts: int, window: float):
        self.max_restarts = max_restarts
        self.window = window
        self.times: deque = deque()

    def allow(self, now: float) -> bool:
        """Record one restart; False once the limit is exceeded."""
        self.times.append(now)
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        return len(self.times) <= self.max_restarts


def backoff(consecutive_failures: int) -> float:
    """The first restart is immediate; an actor that keeps dying waits longer each time (max 5 s)."""
    if consecutive_failures <= 1:
        return 0.0
    return min(5.0, 0.25 * 2 ** (consecutive_failures - 1))
