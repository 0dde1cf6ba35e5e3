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


async def _send_part(client, node):
    """A forward stream's first (and only) part, without its end-of-input: (reader, writer)."""
    from hivemind.p2p import PeerID

    from protocol import stream_framing as framing
    from tests.helpers.rpc import PREFIX, request

    _, reader, writer = await client.swarm.p2p.call_binary_stream_handler(
        PeerID.from_base58(node.peer_id), PREFIX + "rpc_forward_stream"
    )
    framing.write_message(writer, request("rpc_forward_stream"))
    await writer.drain()
    return reader, writer


async def _read_reply(reader, timeout: float) -> list:
    """The frames of the reply, up to the server's close or its error frame."""
    from protocol import stream_framing as framing

    frames = []
    while True:
        try:
            frames.append(await asyncio.wait_for(framing.read_frame(reader), timeout))
        except asyncio.IncompleteReadError:
            return frames
        if frames[-1][0] == framing.ERROR:
            return frames


def test_a_stream_still_being_sent_through_a_reload_is_answered(tmp_path, micro_hf):
    """The stream keeper holds forward and backward streams (procs/keeper.py): a forward stream whose client
    is still sending while every frontend is replaced is answered once its request is complete, with
    transformers' output, as if nothing had happened."""
    from hivemind.proto import runtime_pb2

    from protocol import stream_framing as framing
    from protocol import wire
    from tests.helpers.rpc import hidden

    with NodeProcess(MICRO_LLAMA, tmp_path / "node", "--drain_timeout", "1") as node:
        with Client(node.maddrs, "micro-llama") as client:

            async def call() -> list:
                reader, writer = await _send_part(client, node)
                try:
                    before = len(node.log_events())
                    os.kill(node.proc.pid, signal.SIGHUP)
                    while not any(e.get("event") == "reload done" for e in node.log_events()[before:]):
                        await asyncio.sleep(0.2)
                    framing.end_of_stream(writer)  # the request is complete only now
                    await writer.drain()
                    return await _read_reply(reader, 60)
                finally:
                    writer.close()

            frames = client.run(call(), timeout=150)
        events = node.log_events()
    assert frames and all(marker == framing.MESSAGE for marker, _ in frames), frames
    parts = [runtime_pb2.ExpertResponse.FromString(payload).tensors[0] for _, payload in frames]
    assembler = wire.StreamAssembler()
    (output,) = [t for part in parts for t in assembler.feed([part])]
    assert rel_err(wire.to_torch(wire.decode_tensor(output)), hf_blocks(micro_hf, hidden(), 0, 4)) <= TOL
    assert [e["calls_handed_over"] for e in events if e.get("event") == "retired"] == [0]


def test_a_stream_still_being_sent_when_the_node_stops_gets_its_final_error(tmp_path):
    """A forward stream whose client is still sending when the node stops is answered with the node's
    shutting-down error by the stream keeper as it stops, not cut off with no answer."""
    from protocol import stream_framing as framing
    from protocol.messages import SHUTTING_DOWN

    with NodeProcess(MICRO_LLAMA, tmp_path / "node", "--shutdown_grace", "1") as node:
        with Client(node.maddrs, "micro-llama") as client:

            async def call() -> list:
                reader, writer = await _send_part(client, node)
                try:
                    await asyncio.sleep(1.0)
                    os.kill(node.proc.pid, signal.SIGTERM)
                    return await _read_reply(reader, 90)
                finally:
                    writer.close()

            frames = client.run(call(), timeout=120)
        wait_until(lambda: any(e.get("event") == "stopped" for e in node.log_events()), 120, "the keeper stopped", node)
        events = node.log_events()
    assert frames, "the stream ended with no answer"
    marker, payload = frames[-1]
    assert marker == framing.ERROR and SHUTTING_DOWN in framing.error_text(payload), frames
    stopped = [e for e in events if e.get("event") == "stopped" and e.get("actor") == "keeper"]
    assert stopped and stopped[0]["calls_cut"] == 1, stopped


def test_calls_outliving_a_retirement_are_answered_by_its_successor(tmp_path, micro_hf):
    """A frontend that retires (a reload) gives the calls still under way at its --drain_timeout back to
    the stream keeper, which asks its successor. The new runtime is stopped once the reload has started it,
    so forwards (unary and streams) wait in the old frontend through its retirement; resumed, every one is
    answered with transformers' output, none with an error."""
    torch.manual_seed(7)
    inputs = [torch.randn(1, 5, 64), torch.randn(1, 4200, 64), torch.randn(2, 3, 64), torch.randn(1, 4300, 64)]
    flags = ("--drain_timeout", "0.5", "--heartbeat_timeout", "120")  # the stopped runtime is not replaced
    with NodeProcess(MICRO_LLAMA, tmp_path / "node", *flags) as node:
        with Client(node.maddrs, "micro-llama") as client:
            span = client.route(0, 4)[0]
            old_runtime = node.actor_pid("runtime.0")
            os.kill(node.proc.pid, signal.SIGHUP)
            runtime = node.wait_ready("runtime.0", old_runtime, timeout=120)
            os.kill(runtime, signal.SIGSTOP)
            try:
                waiting = [
                    asyncio.run_coroutine_threadsafe(client.swarm.forward_span(span, x), client._loop) for x in inputs
                ]
                wait_until(
                    lambda: any(e.get("event") == "retired" for e in node.log_events()), 120, "a retirement", node
                )
            finally:
                os.kill(runtime, signal.SIGCONT)
            results = [w.result(timeout=120) for w in waiting]
            wait_until(lambda: any(e.get("event") == "reload done" for e in node.log_events()), 120, "reload", node)
        events = node.log_events()
    for x, out in zip(inputs, results):
        assert rel_err(out, hf_blocks(micro_hf, x, 0, 4)) <= TOL
    retired = [e for e in events if e.get("event") == "retired"]
    resent = {e["rpc"] for e in events if e.get("event") == "call sent again"}
    assert sum(e["calls_handed_over"] for e in retired) == len(inputs), retired
    assert resent == {"rpc_forward", "rpc_forward_stream"}, resent
