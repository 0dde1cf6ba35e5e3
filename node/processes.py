"""The supervisor's process table: how actors are started, watched and stopped, and when to give up.

Restart intensity follows Erlang/OTP: more than `max_restarts` restarts within `window` seconds
means something is wrong that restarting will not fix, so the whole node exits and lets systemd
or supervisord decide.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

# the rendezvous file of the runtimes' tensor-parallel group, new for each incarnation (node/tp_group.py)
TP_STORE_ENV = "NODE_TP_STORE"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (so nothing outlives a supervisor
    killed with -9). Also usable as a Popen preexec_fn for programs we cannot change (p2pd)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass  # not Linux: heartbeats and the owner's own cleanup are the fallback


def stop_with_parent() -> None:
    die_with_parent(signal.SIGTERM)


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
    stats: dict = field(default_factory=dict)
    restarts: int = 0
    consecutive_failures: int = 0
    respawn_at: Optional[float] = None  # set while waiting out a backoff
    stopping: bool = False
    load_ordered: bool = False  # runtime only: LoadBlocks was sent to this process
    env: dict = field(default_factory=dict)  # added to its environment at each spawn

    @property
    def pid(self) -> Optional[int]:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self, run_dir: str) -> None:
        env = child_env(NODE_SUPERVISOR_PID=str(os.getpid()), **self.env)
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
        self.stopping = False
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
