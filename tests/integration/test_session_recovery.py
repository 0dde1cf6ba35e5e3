"""Sessions that survive: a runtime replaced in the middle of a generation costs the client one slow step,
then it gets the same tokens it would have got (DESIGN section 4, node/frontend/history.py).

A real node serves micro-llama; the project's client generates greedily through it while the test kills
the runtime with -9 or stops it (SIGSTOP: the supervisor finds it silent and replaces it). The tokens
must equal transformers' greedy generation. Beams (hypo_ids), rollbacks, deep prompts, forwards and the
other actors (allocator, announcer) are checked the same way.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from typing import Callable

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from node.client.generate import LocalHead
from node.client.swarm import Client
from node.tools.launcher import NodeProcess
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import hf_blocks, rel_err
from tests.helpers.waiting import wait_until

PROMPT = torch.tensor([[1, 17, 42, 99, 3]])
TOL = 1e-5


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    # history room for 3 sessions of 80 tokens (80 x 64 values x 4 bytes each), not for a 4th
    flags = ["--num_handlers", "2", "--heartbeat_timeout", "3", "--max_restarts", "100", "--history_bytes", "64KiB"]
    with NodeProcess(MICRO_LLAMA, tmp_path_factory.mktemp("recovery") / "node", *flags) as node:
        yield node


@pytest.fixture(scope="module")
def client(node):
    with Client(node.maddrs, "micro-llama") as client:
        yield client


@pytest.fixture(scope="module")
def head():
    return LocalHead(str(MICRO_LLAMA), dtype=torch.float32)


@pytest.fixture(scope="module")
def expected():
    model = AutoModelForCausalLM.from_pretrained(str(MICRO_LLAMA), dtype=torch.float32).eval()
    return model.generate(PROMPT, max_new_tokens=64, do_sample=False, attention_mask=torch.ones_like(PROMPT))


def runtime_pid(node) -> int:
    return node.status["actors"]["runtime.0"]["pid"]


def kill_runtime(node) -> None:
    os.kill(runtime_pid(node), signal.SIGKILL)


def hang_runtime(node) -> None:
    pid = runtime_pid(node)
    os.kill(pid, signal.SIGSTOP)  # the supervisor kills it after --heartbeat_timeout and starts another


def generate(client, head, n: int, faults: dict[int, Callable[[], None]]) -> torch.Tensor:
    """Greedy decoding in one session, `faults[k]()` run just before the step that makes token k."""
    tokens = PROMPT
    with client.session(max_length=PROMPT.shape[1] + n, start=0, end=4) as session:
        hidden = session.step(head.embed(PROMPT))
        for k in range(n):
            next_token = head.logits(hidden[:, -1:]).argmax(-1)
            tokens = torch.cat([tokens, next_token], dim=1)
            if k + 1 == n:
                break
            if k + 1 in faults:
                faults[k + 1]()
            hidden = session.step(head.embed(next_token))
    return tokens


@pytest.fixture(autouse=True)
def online(node, client):
    """Each test starts with the node ONLINE in the DHT (a replaced runtime makes it JOINING for a while,
    and clients route only through ONLINE servers)."""
    wait_until(lambda: node.status.get("state") == "online" and client.spans(4), 60, "the node ONLINE", node)


def recovered(node) -> int:
    return sum(1 for e in node.log_events() if e.get("event") == "session recovered")


def test_a_generation_survives_runtime_kills_and_a_hang(node, client, head, expected):
    """kill -9 of the runtime before token 10 and token 40, a hung runtime before token 20: the generation
    goes on and its 64 tokens are transformers' own."""
    before = recovered(node)
    faults = {10: lambda: kill_runtime(node), 20: lambda: hang_runtime(node), 40: lambda: kill_runtime(node)}
    tokens = generate(client, head, 64, faults)
    assert tokens.tolist() == expected.tolist()
    assert recovered(node) - before >= 3
    assert node.status["actors"]["runtime.0"]["restarts"] >= 3


def test_beams_rollbacks_and_deep_prompts_survive_a_runtime_kill(node, client, micro_hf):
    """A session with two rows reordered by hypo_ids, a rollback after the restart, and deep prompts: the
    rebuilt cache gives what an uninterrupted session gives."""
    torch.manual_seed(31)
    x = torch.randn(2, 12, 64)
    prompts = torch.randn(4, 2, 3, 64)
    order = torch.tensor([1, 0])

    def run(fault: bool) -> list[torch.Tensor]:
        outs = []
        with client.session(max_length=12, start=0, end=4) as session:
            outs.append(session.step(x[:, :5], prompts=prompts))
            outs.append(session.step(x[:, 5:7], hypo_ids=order))
            if fault:
                kill_runtime(node)
            outs.append(session.step(x[:, 7:9]))
            outs.append(session.step(x[:, 6:10], start_from_position=6))  # a rollback after the restart
        return outs

    reference = run(fault=False)
    survived = run(fault=True)
    for got, want in zip(survived, reference):
        assert rel_err(got, want) <= TOL


def test_several_sessions_are_each_recovered_and_one_without_history_room_gets_a_clear_error(node, client, micro_hf):
    """Four sessions open at once; the node's history memory holds three. After the runtime is killed the
    three go on with the outputs transformers gives, the fourth is told why it cannot."""
    torch.manual_seed(33)
    x = torch.randn(4, 1, 12, 64)
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(client.session(max_length=80, start=0, end=4)) for _ in range(4)]
        for session, xs in zip(sessions, x):
            session.step(xs[:, :10])
        kill_runtime(node)
        for session, xs in zip(sessions[:3], x[:3]):
            got = torch.cat([session.step(xs[:, 10:11]), session.step(xs[:, 11:12])], dim=1)
            assert rel_err(got, hf_blocks(micro_hf, xs, 0, 4)[:, 10:]) <= TOL
        with pytest.raises(Exception, match=r"cannot be rebuilt.*history memory \(--history_bytes\) was full"):
            sessions[3].step(x[3][:, 10:11])
    assert any(e.get("event", "").startswith("session granted without history room") for e in node.log_events())


def test_deep_prompts_are_kept_only_in_room_reserved_for_them(node, client):
    """Deep prompts are kept beside the hidden states once the allocator has reserved their bytes too. One
    session's prompts fit in the 64 KiB of history memory and it is rebuilt like any other; the next one's
    do not: it is served on, and after the runtime's restart told why it cannot be rebuilt."""
    torch.manual_seed(34)
    x = torch.randn(2, 1, 42, 64)
    prompts = [torch.randn(4, 1, 10, 64), torch.randn(4, 1, 40, 64)]  # 10 KiB, then 40 KiB beside 20 KiB each

    def steps(session, xs, ps) -> list[torch.Tensor]:
        return [session.step(xs[:, :40], prompts=ps), session.step(xs[:, 40:41])]

    with client.session(max_length=80, start=0, end=4) as session:
        reference = steps(session, x[0], prompts[0]) + [session.step(x[0][:, 41:42])]
    with (
        client.session(max_length=80, start=0, end=4) as kept,
        client.session(max_length=80, start=0, end=4) as not_kept,
    ):
        got = steps(kept, x[0], prompts[0])
        steps(not_kept, x[1], prompts[1])  # served all the same
        kill_runtime(node)
        got.append(kept.step(x[0][:, 41:42]))
        for a, b in zip(got, reference):
            assert rel_err(a, b) <= TOL
        with pytest.raises(Exception, match=r"cannot be rebuilt.*deep prompts were not kept.*did not fit"):
            not_kept.step(x[1][:, 41:42])
    assert any(e.get("event") == "session history given up" for e in node.log_events())


def test_a_forward_in_flight_is_sent_again_to_the_new_runtime(node, client, micro_hf):
    """A forward that the runtime holds when it dies is not failed: the frontend sends it again."""
    torch.manual_seed(32)
    x = torch.randn(1, 8192, 64)  # long enough to be under way when the runtime dies
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.forward, x, 0, 4)
        time.sleep(0.3)
        kill_runtime(node)
        assert rel_err(future.result(120), hf_blocks(micro_hf, x, 0, 4)) <= TOL


@pytest.mark.parametrize("actor", ["allocator", "announcer"])
def test_a_session_goes_on_while_the_allocator_or_the_announcer_is_replaced(node, client, head, expected, actor):
    def kill():
        pid = node.status["actors"][actor]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: node.status["actors"][actor]["pid"] != pid, 30, f"a new {actor}")

    tokens = generate(client, head, 24, {8: kill})
    assert tokens.tolist() == expected[:, : PROMPT.shape[1] + 24].tolist()


def test_no_process_was_left_stopped(node):
    for pid in node.all_pids():
        try:
            assert psutil.Process(pid).status() != psutil.STATUS_STOPPED
        except psutil.NoSuchProcess:
            pass
