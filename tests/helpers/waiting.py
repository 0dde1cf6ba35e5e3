"""Waiting for a condition in a test, with a bound."""

from __future__ import annotations

import time
from typing import Callable


def wait_until(predicate: Callable, timeout: float = 60.0, what: str = "the condition", node=None, every: float = 0.1):
    """The first true value of `predicate()` within `timeout` seconds; else AssertionError naming `what`
    (with the tail of `node`'s log when a node is given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not seen after {timeout} s" + (f"\n{node.log_tail(30)}" if node is not None else ""))


def wait_online_with_new_group(node, old: dict, deadline: float) -> None:
    """A tensor-parallel node whose ranks were replaced (new pids than in `old`, a status.json's actors)
    is ONLINE again, before `deadline` (time.monotonic)."""
    while time.monotonic() < deadline:
        actors = node.status.get("actors", {})
        fresh = all(
            actors.get(n, {}).get("ready") and actors[n]["pid"] != old[n]["pid"] for n in ("runtime.0", "runtime.1")
        )
        if fresh and node.status.get("state") == "online":
            return
        time.sleep(0.1)
    raise TimeoutError(f"the group did not come back: {node.status}\n{node.log_tail(40)}")
