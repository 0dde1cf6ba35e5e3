"""A rolling reload (SIGHUP, `systemctl reload`) under a load of clients: no client call fails, a session
longer than a retiring frontend's --drain_timeout is handed to its successor, and every actor but the
supervisor and the stream keeper runs the code now on disk afterwards (node/supervisor/reload.py).

The node runs from a copy of the project that the test changes before the reload, so the processes'
code versions (node/code_version.py, reported in status.json) tell old code from new.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time

import pytest
import torch

from node.client.swarm import Client
from node.code_version import PACKAGES, code_version
from node.tools.launcher import ROOT, NodeProcess
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import hf_blocks, rel_err
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.reliability
TOL = 1e-5
CLIENTS = 3


def copy_project(to) -> str:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, to / package, ignore=shutil.ignore_patterns("__pycache__"))
    return str(to)


def test_reload_under_load_fails_no_call_and_runs_the_new_code(tmp_path, micro_hf):
    root = copy_project(tmp_path / "checkout")
    old_code = code_version(root)
    torch.manual_seed(41)
    inputs = [torch.randn(1, 24, 64) for _ in range(CLIENTS)] + [torch.randn(1, 32, 64)]
    expected = [hf_blocks(micro_hf, x, 0, 4) for x in inputs]
    # the long session outlives a retiring frontend's --drain_timeout: the keeper hands it to the new one
    flags = ["--num_handlers", "2", "--drain_timeout", "2"]
    with NodeProcess(MICRO_LLAMA, tmp_path / "node", *flags, root=root) as node:
        failures: list[str] = []
        calls = [0] * (CLIENTS + 1)
        stop = threading.Event()

        def check(i: int, what: str, got, want) -> None:
            if rel_err(got, want) > TOL:
                failures.append(f"client {i}: {what} differs from transformers")

        def load(i: int) -> None:
            """Short sessions, forwards and rpc_info, again and again: calls start before, during and after."""
            x, want = inputs[i], expected[i]
            with Client(node.maddrs, "micro-llama") as client:
                while not stop.is_set():
                    try:
                        with client.session(max_length=24, start=0, end=4) as session:
                            steps = [session.step(x[:, :16])] + [session.step(x[:, t : t + 1]) for t in range(16, 24)]
                        check(i, "a session", torch.cat(steps, 1), want)
                        check(i, "a forward", client.forward(x[:, :8], 0, 4), want[:, :8])
                        client.rpc_info(node.peer_id, "micro-llama.0")
                        calls[i] += 3
                    except Exception as e:
                        failures.append(f"client {i}: {e!r}"[:400])

        def long_session() -> None:
            """One session open across the reload (about 15 s), a step every 0.5 s: longer than the 2 s its
            frontend is given when it retires, so it is handed over, and its client sees no error."""
            x, want = inputs[CLIENTS], expected[CLIENTS]
            with Client(node.maddrs, "micro-llama") as client:
                try:
                    with client.session(max_length=32, start=0, end=4) as session:
                        steps = [session.step(x[:, :1])]
                        for t in range(1, 32):
                            time.sleep(0.5 if not stop.is_set() else 0)
                            steps.append(session.step(x[:, t : t + 1]))
                            calls[CLIENTS] += 1
                    check(CLIENTS, "the long session", torch.cat(steps, 1), want)
                except Exception as e:
                    failures.append(f"long session: {e!r}"[:400])

        threads = [threading.Thread(target=load, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=long_session))
        for thread in threads:
            thread.start()
        try:
            time.sleep(2)
            with open(os.path.join(root, "procs", "runtime.py"), "a") as f:
                f.write("\n# changed by tests/integration/test_reload.py: a new version of the code\n")
            new_code = code_version(root)
            before = len(node.log_events())
            os.kill(node.proc.pid, signal.SIGHUP)
            wait_until(
                lambda: any(e.get("event") == "reload done" for e in node.log_events()[before:]),
                120,
                "the reload done",
                node,
            )
            time.sleep(2)  # calls after the reload, through the new frontends
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        status = node.status
        events = node.log_events()[before:]

    print(f"reliability: reload under {CLIENTS + 1} clients: {sum(calls)} calls, {len(failures)} failed")
    assert not failures, failures[:5]
    assert all(calls), calls
    assert not any(e.get("event") == "reload failed" for e in events)
    assert any(e.get("event") == "stream handed over" for e in events)
    retired = [e for e in events if e.get("event") == "retired"]
    assert len(retired) == 2 and sum(e["sessions_handed_over"] for e in retired) >= 1
    assert new_code != old_code
    assert status["code"] == old_code  # the supervisor is not replaced
    assert status["reloads"] == 1
    actors = status["actors"]
    # nor the stream keeper: the sessions' streams live in it (docs/reliability.md)
    assert actors.pop("keeper")["code"] == old_code
    assert {name: a["code"] for name, a in actors.items()} == dict.fromkeys(actors, new_code)
    assert sorted(n for n in actors if n.startswith("frontend")) == ["frontend.2", "frontend.3"]
    assert all(a["restarts"] == 0 for a in actors.values())  # a reload is not a failure
    states = [e["state"] for e in events if e.get("event") == "state" and e.get("actor") == "supervisor"]
    assert "JOINING" not in states and "OFFLINE" not in states  # ONLINE throughout


@pytest.mark.parametrize(
    "sig, flag, ended",
    [(signal.SIGHUP, "--drain_timeout", "retired"), (signal.SIGTERM, "--shutdown_grace", "drained")],
    ids=["reload", "stop"],
)
def test_a_call_outliving_a_retirement_gets_its_final_error(tmp_path, sig, flag, ended):
    """A forward stream whose client is still sending when its frontend's retirement (a reload) or drain
    (a stop) ends is answered with the node's shutting-down error, not cut off by the frontend's exit with
    no answer (node/frontend/rpcs.py `cut_calls`)."""
    from hivemind.p2p import PeerID

    from protocol import stream_framing as framing
    from protocol.messages import SHUTTING_DOWN
    from tests.helpers.rpc import PREFIX, request

    with NodeProcess(MICRO_LLAMA, tmp_path / "node", flag, "1") as node:
        with Client(node.maddrs, "micro-llama") as client:

            async def call() -> list:
                _, reader, writer = await client.swarm.p2p.call_binary_stream_handler(
                    PeerID.from_base58(node.peer_id), PREFIX + "rpc_forward_stream"
                )
                try:
                    # the first part of a request, and no end-of-input: the frontend waits for the rest
                    framing.write_message(writer, request("rpc_forward_stream"))
                    await writer.drain()
                    await asyncio.sleep(1.0)
                    os.kill(node.proc.pid, sig)
                    frames = []
                    while True:
                        try:
                            frames.append(await asyncio.wait_for(framing.read_frame(reader), 90))
                        except asyncio.IncompleteReadError:
                            return frames
                        if frames[-1][0] == framing.ERROR:
                            return frames
                finally:
                    writer.close()

            frames = client.run(call(), timeout=120)
        wait_until(lambda: any(e.get("event") == ended for e in node.log_events()), 120, f"a {ended} line", node)
        events = node.log_events()
    assert frames, "the stream ended with no answer"
    marker, payload = frames[-1]
    assert marker == framing.ERROR and SHUTTING_DOWN in framing.error_text(payload), frames
    lines = [e for e in events if e.get("event") == ended]
    assert lines and sum(e["calls_cut"] for e in lines) == 1, lines
