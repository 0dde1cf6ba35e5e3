"""An unmodified Petals client against the node, and the node in one swarm with Petals servers.

Petals pins versions that cannot live in the node's environment, so the client scripts and the Petals
servers run under another interpreter: $PETALS_PYTHON, else the Petals 2.2.0.post1 environment that
`python3 -m node.tools.petals_env` builds (tests/helpers/petals.py). Every Petals release reads the model
these tests use (micro-llama without its llama3 rope scaling); the node and transformers load the same copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

from node.bench_petals import stop_group
from node.tools.launcher import NodeProcess
from tests.helpers.petals import (
    PETALS_PYTHON,
    client_argv,
    petals_llama,
    petals_version,
    start_petals_server,
    why_missing,
)
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.petals, pytest.mark.skipif(not PETALS_PYTHON, reason=why_missing())]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return petals_llama(tmp_path_factory.mktemp("petals_model"))


CLIENT = textwrap.dedent(
    """
    import sys, torch
    from petals import AutoDistributedModelForCausalLM
    from transformers import AutoModelForCausalLM
    model_path, peers = sys.argv[1], sys.argv[2:]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_path, initial_peers=peers, dht_prefix="micro-llama", torch_dtype=torch.float32
    )
    ref = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    ids = torch.tensor([[1, 17, 42, 99, 3]])
    ours = model.generate(ids, max_new_tokens=20, do_sample=False)
    theirs = ref.generate(ids, max_new_tokens=20, do_sample=False)
    assert ours.tolist() == theirs.tolist(), (ours.tolist(), theirs.tolist())
    x = torch.randn(2, 9, ref.config.hidden_size, requires_grad=True)
    y = model.model.layers(x)
    y.backward(torch.ones_like(y))
    leaf, out = x.detach().clone().requires_grad_(True), {}
    ref.model.layers[0].register_forward_pre_hook(lambda m, a, k: ((leaf,) + a[1:], k), with_kwargs=True)
    ref.model.layers[-1].register_forward_hook(lambda m, a, o: out.__setitem__("y", o[0]))
    ref(inputs_embeds=torch.zeros_like(x))
    out["y"].backward(torch.ones_like(out["y"]))
    assert float((y - out["y"]).abs().max() / out["y"].abs().max()) <= 1e-5
    assert float((x.grad - leaf.grad).abs().max() / leaf.grad.abs().max()) <= 1e-5
    print("PETALS CLIENT OK")
    """
)


@contextlib.contextmanager
def petals_process(script: str, model, *args: str):
    """A client script under PETALS_PYTHON (model path, then `args`), talked to through its stdin and
    stdout; killed if it is still running when the test leaves."""
    client = subprocess.Popen(
        client_argv(script, str(model), *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # with the DHT process it forks, and that one's p2pd
    )
    try:
        yield client
    finally:
        try:
            os.killpg(client.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        client.wait()


FINAL_LINE = "PETALS CLIENT OK"  # what a client script prints once every check of its own has passed
EXIT_GRACE = 15.0  # seconds a script that printed it gets to exit


def finish(client: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The rest of a client script's stdout and stderr once it has exited, or once it has printed
    FINAL_LINE and had EXIT_GRACE seconds to exit. Not communicate(): that waits for every process holding
    the pipes, and the Petals client's own exit (hivemind stopping its DHT process and their p2pd daemons)
    hung for good after the line in about one full run of the suite in six, its checks all passed; what
    lingers is killed with the script's process group, and the test says so."""
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda f=f, acc=acc: acc.extend(iter(f.readline, "")), daemon=True)
        for f, acc in ((client.stdout, out), (client.stderr, err))
    ]
    for reader in readers:
        reader.start()
    deadline, printed_at = time.monotonic() + timeout, None
    while client.poll() is None and time.monotonic() < deadline:
        if printed_at is None and any(FINAL_LINE in line for line in out):
            printed_at = time.monotonic()
        if printed_at is not None and time.monotonic() - printed_at > EXIT_GRACE:
            print(f"the Petals client printed {FINAL_LINE!r} and did not exit within {EXIT_GRACE:.0f} s: killed")
            break
        time.sleep(0.1)
    try:
        os.killpg(client.pid, signal.SIGKILL)  # its DHT process and p2pd daemons, if they linger
    except ProcessLookupError:
        pass
    for reader in readers:
        reader.join(10)
    return "".join(out), "".join(err)


def run_client(model, peers: list[str]) -> None:
    with petals_process(CLIENT, model, *peers) as client:
        out, err = finish(client, 240)
    assert FINAL_LINE in out, out[-3000:] + err[-3000:]


def pushes_received_by_node(node: NodeProcess) -> int:
    """rpc_push calls the node's frontends took (node_requests_total{rpc="rpc_push"} on /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.status['metrics_port']}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(r'^node_requests_total\{rpc="rpc_push"\} ([0-9.e+]+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def pushes_received_by_petals(log, pusher_peer_id: str) -> int:
    """rpc_push calls a Petals server took from one peer: with HIVEMIND_LOGLEVEL=DEBUG its handler logs
    each as `rpc_push(blocks=A:B, remote_peer=...XXXXXX)`, the last six characters of the pusher's id."""
    return log.read_text(errors="replace").count(f"rpc_push(blocks=2:4, remote_peer=...{pusher_peer_id[-6:]})")


def test_petals_client_generates_through_the_node(tmp_path, model):
    with NodeProcess(model, tmp_path / "node", "--num_handlers", "2") as node:
        run_client(model, node.maddrs)


def client_asks_for_pushes() -> bool:
    """A 2.2.0 client sends next_servers, asking each server to push to the next; the main branch's does not."""
    return petals_version() < (2, 3)


def test_node_then_petals_server_pushes_from_the_node_to_petals(tmp_path, model, monkeypatch):
    """The node serves 0:2, a Petals server 2:4: the client generates, forwards and trains through both,
    equal to transformers; the Petals server logs pushes that came from the node (when the client asks
    for them: a 2.2.0 client)."""
    monkeypatch.setenv("HIVEMIND_LOGLEVEL", "DEBUG")  # only the Petals server reads it: its rpc_push lines
    with NodeProcess(model, tmp_path / "node", "--block_indices", "0:2") as node:
        log = tmp_path / "petals_server.log"
        server, _ = start_petals_server(model, log, node.maddrs, "--block_indices", "2:4")
        try:
            run_client(model, node.maddrs)
            pushes = pushes_received_by_petals(log, node.peer_id)
            if client_asks_for_pushes():
                assert pushes > 0, "no push from the node reached Petals"
            else:
                assert pushes == 0, "the node pushed though the client named no next servers"
        finally:
            stop_group(server)


def test_petals_server_then_node_in_one_swarm(tmp_path, model):
    """The other order: a Petals server starts the swarm with 0:2, the node joins it for 2:4; the client's
    generation, forward and backward are transformers'. Pushes from the Petals server to the node are
    counted by the node, and there are none: Petals 2.2.0's server never pushes (it reads next_servers from
    the metadata of the session's first message, which has none: Petals' handler.py, rpc_inference; fixed
    after 2.2.0, where the step's own metadata is used), and a later client never asks for pushes. The
    Petals -> node push would need a 2.2.0 client with a later server, two Petals in one test."""
    server, maddrs = start_petals_server(model, tmp_path / "petals_server.log", None, "--block_indices", "0:2")
    try:
        flags = ["--block_indices", "2:4", "--metrics_port", "0", "--initial_peers", *maddrs]
        with NodeProcess(model, tmp_path / "node", *flags) as node:
            run_client(model, maddrs)
            assert pushes_received_by_node(node) == 0, "the Petals server pushed: the docstring is wrong"
    finally:
        stop_group(server)


def test_node_to_node_push_chain(tmp_path, model):
    """Two nodes, 0:2 and 2:4: a Petals 2.2.0 client asks the first to push to the second, and it does (a
    later client asks for no pushes, and there are none)."""
    with NodeProcess(model, tmp_path / "first", "--block_indices", "0:2") as first:
        flags = ["--block_indices", "2:4", "--metrics_port", "0", "--initial_peers", *first.maddrs]
        with NodeProcess(model, tmp_path / "second", *flags) as second:
            run_client(model, first.maddrs)
            if client_asks_for_pushes():
                assert pushes_received_by_node(second) > 0, "no push from the first node reached the second"
            else:
                assert pushes_received_by_node(second) == 0, "the first node pushed unasked"


def test_node_and_petals_server_choose_blocks_by_the_same_rule(tmp_path, model):
    """A Petals server holds 0:2; a node with --num_blocks 2 takes 2:4 (the Petals rule over the
    swarm it reads, Petals records included); a second Petals server then sees the swarm evenly
    covered and takes the first window, 0:2, as the rule says; a Petals client generates through it."""
    from node.client.swarm import Client

    with NodeProcess(model, tmp_path / "seed", "--block_indices", "0:4") as seed:
        first, _ = start_petals_server(model, tmp_path / "petals1.log", seed.maddrs, "--block_indices", "0:2")
        try:
            with NodeProcess(
                model,
                tmp_path / "node",
                "--num_blocks",
                "2",
                "--mean_block_selection_delay",
                "0.2",
                "--initial_peers",
                *seed.maddrs,
            ) as node:
                assert node.status["blocks"] == [2, 4]
                second, _ = start_petals_server(model, tmp_path / "petals2.log", seed.maddrs, "--num_blocks", "2")
                try:
                    with Client(seed.maddrs, "micro-llama") as client:
                        deadline = time.monotonic() + 60
                        while len(client.spans(4)) < 4:
                            assert time.monotonic() < deadline, client.spans(4)
                            time.sleep(0.5)
                        spans = {
                            (s.start, s.end) for s in client.spans(4) if s.peer_id not in (seed.peer_id, node.peer_id)
                        }
                    assert spans == {(0, 2)}, spans  # both Petals servers on 0:2
                    run_client(model, node.maddrs)
                finally:
                    stop_group(second)
        finally:
            stop_group(first)


MID_SESSION_CLIENT = textwrap.dedent(
    """
    import sys, torch
    from petals import AutoDistributedModelForCausalLM
    from transformers import AutoModelForCausalLM
    model_path, peers = sys.argv[1], sys.argv[2:]
    def connect(**kwargs):
        return AutoDistributedModelForCausalLM.from_pretrained(
            model_path, initial_peers=peers, dht_prefix="micro-llama", torch_dtype=torch.float32, **kwargs
        )
    ref = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    ids = torch.tensor([[1, 17, 42, 99, 3]])
    theirs = ref.generate(ids, max_new_tokens=20, do_sample=False)
    model = connect(max_retries=3)
    with model.inference_session(max_length=32) as session:
        first = model.generate(ids, max_new_tokens=10, do_sample=False, session=session)
        assert first.tolist() == theirs[:, :15].tolist(), (first.tolist(), theirs.tolist())
        print("HALF", flush=True)
        sys.stdin.readline()  # the test kills rank 1 of the node meanwhile
        try:
            more = model.generate(None, max_new_tokens=10, do_sample=False, session=session)
            assert more[:, -10:].tolist() == theirs[:, -10:].tolist(), (more.tolist(), theirs.tolist())
            print("SESSION RESUMED", flush=True)
        except Exception as e:
            print("SESSION FAILED", repr(e)[:300], flush=True)
    print("WAITING", flush=True)
    sys.stdin.readline()  # the test waits for the group to be back
    ours = connect().generate(ids, max_new_tokens=20, do_sample=False)  # a fresh client: the old one banned the node
    assert ours.tolist() == theirs.tolist(), (ours.tolist(), theirs.tolist())
    print("PETALS CLIENT OK", flush=True)
    """
)


def test_petals_client_through_a_tensor_parallel_node_and_a_rank_kill_mid_session(tmp_path, model):
    """Two CPU ranks: a real Petals client generates what transformers does and gets the same gradients,
    as through a single-device node. Then kill -9 of rank 1 in the middle of a generation session: the
    group restarts, and the session goes on with transformers' tokens, the client unaware (its next step
    waits while the node rebuilds the session's cache; a Petals client cannot replay a session itself,
    bigscience-workshop/petals#587). A fresh client is served afterwards too."""
    from tests.helpers.waiting import wait_online_with_new_group

    with NodeProcess(model, tmp_path / "node", "--tensor_parallel_devices", "cpu", "cpu") as node:
        run_client(model, node.maddrs)
        with petals_process(MID_SESSION_CLIENT, model, *node.maddrs) as client:
            lines = []

            def next_line() -> str:
                lines.append(client.stdout.readline().strip())
                assert lines[-1], "".join(lines) + client.stderr.read()[-3000:]
                return lines[-1]

            assert next_line() == "HALF"
            old = node.status["actors"]
            os.kill(old["runtime.1"]["pid"], signal.SIGKILL)
            client.stdin.write("\n")
            client.stdin.flush()
            assert next_line() == "SESSION RESUMED", lines
            assert next_line() == "WAITING"
            wait_online_with_new_group(node, old, time.monotonic() + 120)
            client.stdin.write("\n")
            client.stdin.flush()
            out, err = finish(client, 240)
        print(lines)
        assert FINAL_LINE in out, out[-3000:] + err[-3000:]


TOKEN_BY_TOKEN_CLIENT = textwrap.dedent(
    """
    import sys, torch
    from petals import AutoDistributedModelForCausalLM
    from transformers import AutoModelForCausalLM
    model_path, n, peers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_path, initial_peers=peers, dht_prefix="micro-llama", torch_dtype=torch.float32
    )
    ref = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    ids = torch.tensor([[1, 17, 42, 99, 3]])
    theirs = ref.generate(ids, max_new_tokens=n, do_sample=False)
    second = None  # another client in this process, for a generation of its own (a model's session is its default)
    with model.inference_session(max_length=ids.shape[1] + n) as session:
        tokens = [model.generate(ids, max_new_tokens=1, do_sample=False, session=session)[:, -1:]]
        for k in range(1, n):
            print(f"TOKEN {k}", flush=True)
            if sys.stdin.readline().strip() == "another":  # the test may break the node here, or ask for this
                second = second or AutoDistributedModelForCausalLM.from_pretrained(
                    model_path, initial_peers=peers, dht_prefix="micro-llama", torch_dtype=torch.float32
                )
                other = second.generate(ids[:, :3], max_new_tokens=4, do_sample=False)
                assert other.tolist() == ref.generate(ids[:, :3], max_new_tokens=4, do_sample=False).tolist()
                print("ANOTHER OK", flush=True)
            tokens.append(model.generate(None, max_new_tokens=1, do_sample=False, session=session)[:, -1:])
    ours = torch.cat([ids, *tokens], dim=1)
    assert ours.tolist() == theirs.tolist(), (ours.tolist(), theirs.tolist())
    print("PETALS CLIENT OK", flush=True)
    """
)


def run_with_faults(script: str, model, n: int, node, faults: dict) -> None:
    """Run a client script that prints "TOKEN k" and waits for a line before its token k (1 <= k < n):
    `faults[k]()` breaks the node there. A fault that returns a word (TOKEN_BY_TOKEN_CLIENT: "another")
    sends it as that line, and the script must answer "<WORD> OK". The script must end with PETALS CLIENT OK."""
    with petals_process(script, model, str(n), *node.maddrs) as client:
        for k in range(1, n):
            line = client.stdout.readline().strip()
            assert line == f"TOKEN {k}", line + client.stderr.read()[-3000:]
            word = faults[k]() if k in faults else None
            client.stdin.write((word or "") + "\n")
            client.stdin.flush()
            if word:
                line = client.stdout.readline().strip()
                assert line == f"{word.upper()} OK", line + client.stderr.read()[-3000:]
        out, err = finish(client, 300)
    assert FINAL_LINE in out, out[-3000:] + err[-3000:]


def test_petals_client_generation_survives_runtime_kills_a_hang_and_a_reload(tmp_path, model):
    """An unmodified Petals client generates 64 tokens in one session while the node's runtime is killed
    with -9 before tokens 10 and 40, hangs before token 20 (the supervisor replaces it) and the node is
    reloaded (SIGHUP) before token 50: the generation completes with transformers' tokens (issue 13)."""
    flags = ["--num_handlers", "2", "--heartbeat_timeout", "3"]
    with NodeProcess(model, tmp_path / "node", *flags) as node:

        def runtime_pid() -> int:
            return node.status["actors"]["runtime.0"]["pid"]

        def reload() -> None:
            os.kill(node.proc.pid, signal.SIGHUP)

        faults = {
            10: lambda: os.kill(runtime_pid(), signal.SIGKILL),
            20: lambda: os.kill(runtime_pid(), signal.SIGSTOP),
            40: lambda: os.kill(runtime_pid(), signal.SIGKILL),
            50: reload,
        }
        run_with_faults(TOKEN_BY_TOKEN_CLIENT, model, 64, node, faults)
        assert sum(e.get("event") == "session recovered" for e in node.log_events()) >= 4
        wait_until(lambda: any(e.get("event") == "reload done" for e in node.log_events()), 120, "the reload", node)


def test_petals_client_generation_completes_through_frontend_kills(tmp_path, model):
    """Issue 21, item 3: the node's only frontend is killed with -9 twice mid-generation, once between two
    tokens and once with a step in flight (stopped, then killed), and hangs once (the supervisor kills
    it): the generation completes with transformers' tokens, in one session (one session id from start
    to end: a client of Petals' main branch cannot replace a session mid-generation, and a 2.2.0 client
    that replayed would have opened a new one), because the stream keeper holds the stream and hands it
    to the frontend's replacement."""
    flags = ["--num_handlers", "1", "--heartbeat_timeout", "3"]
    with NodeProcess(model, tmp_path / "node", *flags) as node:

        def frontend_pid() -> int:
            return node.wait_ready("frontend.0", None, timeout=60)

        def kill() -> None:
            os.kill(frontend_pid(), signal.SIGKILL)

        def kill_in_flight() -> None:
            pid = frontend_pid()
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()  # the client's step reaches it first

        def hang() -> None:
            os.kill(frontend_pid(), signal.SIGSTOP)

        run_with_faults(TOKEN_BY_TOKEN_CLIENT, model, 32, node, {6: kill, 14: kill_in_flight, 22: hang})
        events = node.log_events()
        assert len({e["session"] for e in events if e.get("event") == "session opened"}) == 1
        assert sum(e.get("event") == "stream handed over" for e in events) >= 3
        assert node.status["actors"]["frontend.0"]["restarts"] >= 3


def inference_calls(node: NodeProcess) -> int:
    """rpc_inference streams the node's frontends took (node_requests_total{rpc="rpc_inference"})."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.status['metrics_port']}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(r'^node_requests_total\{rpc="rpc_inference"\} ([0-9.e+]+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def test_petals_client_generation_completes_through_a_stop(tmp_path, model):
    """Issue 21: an unmodified Petals client generates 32 tokens in one session through node A; a second
    server, node B, joins the swarm with the same blocks; A is stopped (SIGTERM) before token 8. A drains:
    the session goes on on A, on its cache, and the generation completes with transformers' tokens (B never
    sees it: B's one rpc_inference is the second generation); a second generation opened during the drain
    is served by B; A exits 0 once the session is closed, long before its grace ends."""
    n = 32
    a = NodeProcess(model, tmp_path / "a", "--shutdown_grace", "120").start()
    started = [a]
    stopped_at = []

    def start_b() -> None:
        flags = ["--metrics_port", "0", "--initial_peers", *a.maddrs]
        started.append(NodeProcess(model, tmp_path / "b", *flags).start())

    def stop_a() -> None:
        stopped_at.append(time.monotonic())
        a.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: a.status.get("state") == "draining", 10, "A draining", a)

    try:
        run_with_faults(TOKEN_BY_TOKEN_CLIENT, model, n, a, {2: start_b, 8: stop_a, 9: lambda: "another"})
        code = a.proc.wait(60)
        stop_seconds = time.monotonic() - stopped_at[0]
        assert code == 0, a.log_tail(40)
        b = started[1]
        assert inference_calls(b) == 1, "the generation moved to B, or the second one did not go there"
        closed = [e for e in a.log_events() if e.get("event") == "session closed"]
        assert closed and closed[-1].get("tokens") == 5 + n - 1, closed
        print(f"\nstop with a Petals client mid-generation: A exited {stop_seconds:.1f} s after SIGTERM")
    finally:
        for node in reversed(started):
            node.stop(signal.SIGKILL if node is a else signal.SIGTERM)


PLACEMENT_FLAGS = ("--mean_block_selection_delay", "0.3", "--update_period", "1")
PLACEMENT_FLAGS += ("--mean_balance_check_period", "1", "--balance_checks", "2")


def test_petals_client_generation_completes_through_a_move(tmp_path, model):
    """Issue 21: node P serves 2:4, node M (--num_blocks 2) takes 0:2, the only free window, so an unmodified
    Petals client's session runs M -> P. Before token 6 a server of ten times M's throughput pins 0:2: the
    swarm is unbalanced, and M moves to 2:4 (loading the new blocks first). The session stays on M's old
    blocks until the client closes it, and the generation completes with transformers' tokens."""
    n = 24
    p = NodeProcess(model, tmp_path / "p", "--block_indices", "2:4", *PLACEMENT_FLAGS).start()
    started = [p]
    try:
        flags = ["--num_blocks", "2", "--drain_timeout", "120", *PLACEMENT_FLAGS, "--initial_peers", *p.maddrs]
        m = NodeProcess(model, tmp_path / "m", *flags).start()
        started.append(m)
        assert m.status["blocks"] == [0, 2]

        def unbalance() -> None:
            opened = [e for e in m.log_events() if e.get("event") == "session opened"]
            assert opened, "the client's session is not on M: the test would prove nothing"
            flags = ["--block_indices", "0:2", "--throughput", "10", *PLACEMENT_FLAGS, "--initial_peers", *p.maddrs]
            started.append(NodeProcess(model, tmp_path / "y", *flags).start())
            wait_until(lambda: m.status["blocks"] == [2, 4], 90, "M serving its new blocks", m)

        run_with_faults(TOKEN_BY_TOKEN_CLIENT, model, n, p, {6: unbalance})
        closed = [e for e in m.log_events() if e.get("event") == "session closed"]
        assert closed and closed[-1].get("tokens") == 5 + n - 1, closed
        # the move is counted once the old blocks are dropped: when the session on them has closed
        wait_until(lambda: m.status.get("moves", 0) == 1, 30, "M's move done", m)
    finally:
        for node in started:
            node.stop()


PTUNE_CLIENT = textwrap.dedent(
    """
    import sys, torch
    from petals import AutoDistributedModelForCausalLM
    model_path, n, peers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_path, initial_peers=peers, dht_prefix="micro-llama", torch_dtype=torch.float32,
        tuning_mode="deep_ptune", pre_seq_len=3,
    )
    torch.manual_seed(5)
    with torch.no_grad():
        model.model.prompt_embeddings.weight.normal_(std=2.0)
        model.model.intermediate_prompt_embeddings.weight.normal_(std=2.0)
    ids = torch.tensor([[1, 17, 42, 99, 3]])

    class Pause:  # a streamer: generate hands it each new token, and it lets the test break the node then
        def __init__(self):
            self.k = -1  # the first put is the prompt

        def put(self, value):
            self.k += 1
            if 1 <= self.k < n:
                print(f"TOKEN {self.k}", flush=True)
                sys.stdin.readline()

        def end(self):
            pass

    def generate(pause):  # one session (generate opens it), token by token
        return model.generate(ids, max_new_tokens=n, do_sample=False, streamer=Pause() if pause else None).tolist()

    reference = generate(pause=False)
    survived = generate(pause=True)
    assert survived == reference, (survived, reference)
    with torch.no_grad():
        model.model.intermediate_prompt_embeddings.weight.zero_()
    assert generate(pause=False) != reference, "the deep prompts changed nothing: the test would prove nothing"
    print("PETALS CLIENT OK", flush=True)
    """
)


def test_petals_client_deep_ptune_generation_survives_a_runtime_kill(tmp_path, model):
    """An unmodified Petals client in deep_ptune mode sends its prompts for every block with the first
    step; the node keeps them in the session's history (room reserved for them) and rebuilds the cache with
    them after kill -9 of the runtime: the tokens equal those of the same generation without a fault."""
    with NodeProcess(model, tmp_path / "node", "--num_handlers", "2") as node:
        run_with_faults(
            PTUNE_CLIENT,
            model,
            16,
            node,
            {5: lambda: os.kill(node.status["actors"]["runtime.0"]["pid"], signal.SIGKILL)},
        )
        events = [e.get("event") for e in node.log_events()]
        assert "session recovered" in events and "session history given up" not in events


def test_bench_against_a_petals_server(tmp_path):
    """node.bench_petals drives the node and a Petals server with a real Petals client and prints both."""
    out = tmp_path / "figures.json"
    bench = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.bench_petals",
            "--petals_python",
            PETALS_PYTHON,
            "--preset",
            "tiny",
            "--tokens",
            "4",
            "--sessions",
            "2",
            "--json",
            str(out),
            "--max_seconds",
            "100",  # each client run and the Petals server's start (the whole bench takes 45 s here)
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        bench.terminate()  # the bench stops both servers, and prints where its logs are and their ends
        stdout, stderr = bench.communicate(timeout=45)
    assert bench.returncode == 0, stdout[-3000:] + stderr[-12000:]
    assert "generation, 2 sessions at once" in stdout and "node/petals" in stdout
    figures = json.loads(out.read_text())
    for side in ("node", "petals"):
        assert figures[side]["tokens_match"] and all(
            figures[side][k] > 0 for k in ("cold_start", "generation", "concurrent", "forward", "backward_ms")
        )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
