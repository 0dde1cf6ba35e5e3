"""The attention cache through a running node: budget, waiting, timeouts, and memory that comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch
from hivemind.p2p import P2PHandlerError

from node.client.swarm import Client
from node.tools.launcher import NodeProcess
from tests.helpers.metrics import scrape_until
from tests.helpers.paths import MICRO_LLAMA, ROOT

# --attn_cache_tokens 64 on micro-llama: 65536 bytes in all; a session costs 1024 bytes per token of
# max_length over 4 blocks, so max_length 40 takes 40960 bytes and two such sessions do not fit.
FULL = 256  # rpc_info cache_tokens_available of the empty cache
MAX_SESSIONS = 6


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    run = tmp_path_factory.mktemp("cache") / "node"
    flags = ["--attn_cache_tokens", "64", "--max_alloc_timeout", "2", "--step_timeout", "4", "--session_timeout", "7"]
    flags += ["--max_sessions", str(MAX_SESSIONS)]
    with NodeProcess(MICRO_LLAMA, run, "--num_handlers", "2", *flags) as node:
        yield node


@pytest.fixture(scope="module")
def client(node):
    with Client(node.maddrs, "micro-llama") as client:
        yield client


def available(client, node) -> int:
    return client.rpc_info(node.peer_id, "micro-llama.0")["cache_tokens_available"]


def wait_available(client, node, value: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while available(client, node) != value:
        assert time.monotonic() < deadline, (
            f"cache_tokens_available stuck at {available(client, node)}, expected {value}"
        )
        time.sleep(0.2)


def step(session, length=2):
    return session.step(torch.randn(1, length, 64))


def test_accounting_follows_sessions(client, node):
    assert available(client, node) == FULL
    with client.session(max_length=40, start=0, end=4) as session:
        step(session)
        assert available(client, node) == FULL - 40 * 4
    wait_available(client, node, FULL)


def test_full_cache_fails_at_once_with_a_clear_error(client, node):
    with client.session(max_length=40, start=0, end=4) as first:
        step(first)
        began = time.monotonic()
        with pytest.raises(P2PHandlerError, match="Could not allocate .* attention cache"):
            with client.session(max_length=40, start=0, end=4) as second:
                step(second)
        assert time.monotonic() - began < 3  # alloc_timeout 0: no waiting
        step(first)  # the first session is undisturbed
    wait_available(client, node, FULL)


def test_alloc_timeout_waits_for_room(client, node):
    first = client.session(max_length=40, start=0, end=4).__enter__()
    step(first)
    threading.Timer(1.0, lambda: first.__exit__(None, None, None)).start()
    with client.session(max_length=40, start=0, end=4, metadata={"alloc_timeout": 10}) as second:
        out = step(second)  # granted once the first session closes, within max_alloc_timeout (2 s)
    assert out.shape == (1, 2, 64)
    wait_available(client, node, FULL)


def test_max_alloc_timeout_caps_the_wait(client, node):
    with client.session(max_length=40, start=0, end=4) as first:
        step(first)
        began = time.monotonic()
        with pytest.raises(P2PHandlerError, match="timed out waiting"):
            with client.session(max_length=40, start=0, end=4, metadata={"alloc_timeout": 60}) as second:
                step(second)
        assert 1.5 < time.monotonic() - began < 10
    wait_available(client, node, FULL)


def test_session_timeout_ends_a_session_and_frees_its_cache(client, node):
    with pytest.raises(P2PHandlerError, match="session_timeout"):
        with client.session(max_length=40, start=0, end=4) as session:
            for _ in range(8):  # a step every 1.5 s keeps within step_timeout (4 s) until 7 s have passed
                step(session, length=1)
                time.sleep(1.5)
    wait_available(client, node, FULL)


def test_idle_session_ends_after_step_timeout(client, node):
    with client.session(max_length=40, start=0, end=4) as session:
        step(session)
        assert available(client, node) == FULL - 160
        time.sleep(5)  # > step_timeout: the server ends the stream and frees the cache
        wait_available(client, node, FULL, timeout=5)
        with pytest.raises(Exception):
            step(session)


def test_a_vanished_client_does_not_hold_memory(client, node):
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        from node.client.swarm import Client
        client = Client({node.maddrs!r}, "micro-llama")
        session = client.session(max_length=40, start=0, end=4).__enter__()
        session.step(torch.randn(1, 2, 64))
        print("stepped", flush=True)
        time.sleep(600)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stepped"
        assert available(client, node) == FULL - 160
        doomed = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        for pid in doomed:  # the client and its p2pd vanish at once, as when its machine goes away
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    wait_available(client, node, FULL, timeout=10)


def test_sessions_beyond_max_sessions_are_refused_whoever_opens_them(client, node):
    """--max_sessions bounds the sessions open at once in all (here from one client; the per-peer limit is
    in tests/integration/test_hostile_peers.py), while the cache still has room."""
    import contextlib

    with contextlib.ExitStack() as stack:
        for _ in range(MAX_SESSIONS):
            session = stack.enter_context(client.session(max_length=1, start=0, end=4))
            step(session, length=1)
        with pytest.raises(P2PHandlerError, match=f"the server has {MAX_SESSIONS} sessions open"):
            with client.session(max_length=1, start=0, end=4) as extra:
                step(extra, length=1)
    with client.session(max_length=1, start=0, end=4) as session:  # room again once they closed
        step(session, length=1)


def test_a_grant_made_after_its_client_left_is_given_back(tmp_path):
    """A client that leaves while its session waits for room: the grant the allocator makes it later was
    dropped by the frontend, and held the cache (and the session's slots) until its lease lapsed, half an
    hour by default. The frontend now gives it back at once."""
    flags = ["--attn_cache_tokens", "64", "--max_alloc_timeout", "60", "--metrics_port", "0"]
    with NodeProcess(MICRO_LLAMA, tmp_path / "node", "--num_handlers", "2", *flags) as node:
        port = node.status["metrics_port"]
        with Client(node.maddrs, "micro-llama") as client:
            first = client.session(max_length=40, start=0, end=4).__enter__()
            step(first)
            script = textwrap.dedent(
                f"""
                import time, torch
                from node.client.swarm import Client
                client = Client({node.maddrs!r}, "micro-llama")
                session = client.session(max_length=40, start=0, end=4, metadata={{"alloc_timeout": 60}}).__enter__()
                print("opening", flush=True)
                session.step(torch.randn(1, 2, 64))  # waits for room
                """
            )
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout.readline().strip() == "opening"
                scrape_until(port, "the second session waiting", lambda s: s.get(("node_cache_waiting", ())) == 1)
                doomed = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
                for pid in doomed:  # the waiting client and its p2pd vanish
                    os.kill(pid, signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
            time.sleep(1.0)  # its stream's end reaches the session that waits
            first.__exit__(None, None, None)  # room: the allocator grants the session nobody waits for
            scrape_until(port, "the late grant given back", lambda s: s.get(("node_cache_waiting", ())) == 0)
            wait_available(client, node, FULL, timeout=10)
