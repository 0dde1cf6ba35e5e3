"""Hostile peers (marker `reliability`): attacks a peer that knows the protocol can make with valid
protobufs and absurd contents, each against a real node while an honest client keeps using it.

For every attack: the attack gets a clear error or bounded service; the honest client (another peer)
is served every time, each request within its bound; no actor dies or is replaced; and the node's
private memory (USS of all its processes) grows by less than MEMORY_BOUND. Every attack is bounded in
count and time. The honest bound, for a forward and for an inference step alike, is `2 x its idle
latency (95th percentile) + 2 x the longest compute round + SLACK`: a request waits at most for the
round under way and then its own, which may also advance another peer's longest forward by a block
(procs/runtime.py training_round); the longest round is measured as one forward of --max_batch_size
tokens through one block; SLACK covers the two shared cores (the attacker's client runs on them too).
Each attack prints a `reliability: attack ...` line with its figures.

`python -m tests.petals_attacks` runs the same attacks against a Petals server and prints the same lines
(figures only: the Petals column of docs/reliability.md's table).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import statistics
import struct
import threading
import time
import uuid
from typing import Callable

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from node.client.swarm import PREFIX, Client
from node.tools.launcher import NodeProcess
from protocol import stream_framing as framing
from protocol import wire
from tests.helpers.memory import PeakMemory, processes_memory
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.rpc import EMPTY, NO_HYPO, UID, Caller, enc, hidden, next_step, request

MiB = 1 << 20
MEMORY_BOUND = 256 * MiB
SLACK = 0.75  # seconds
MAX_TOKENS = 8192  # micro-llama's --max_batch_size (GQA default)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]


# --- the honest client -------------------------------------------------------------------------------


async def honest_calls(swarm, timings: dict) -> None:
    """What an honest client keeps doing: a small forward, and a short inference session; each request
    timed in `timings` ("forward", "step")."""
    began = time.monotonic()
    out = await swarm.forward(torch.randn(1, 4, 64), 0, 4)
    timings["forward"].append(time.monotonic() - began)
    assert out.shape == (1, 4, 64)
    async with swarm.inference_session(max_length=2, start=0, end=4) as session:
        for _ in range(2):
            began = time.monotonic()
            assert (await session.step(torch.randn(1, 1, 64))).shape == (1, 1, 64)
            timings["step"].append(time.monotonic() - began)


class Honest:
    """The honest client's requests in a loop on a thread, each timed; any failure is kept."""

    def __init__(self, client: Client):
        self.client = client
        self.timings: dict[str, list[float]] = {"forward": [], "step": []}
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.run(honest_calls(self.client.swarm, self.timings), timeout=60)
            except Exception as e:
                self.failures.append(f"{type(e).__name__}: {e}"[:300])
                time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(90)


# --- the attacks ---------------------------------------------------------------------------------------
# Each is a coroutine on the attacker's Caller; it returns what the attacker saw, in a few words.


async def next_servers_span(caller: Caller) -> str:
    """An inference step naming a next server over 2**62 blocks (once: gigabytes of uid string)."""
    errors = 0
    for _ in range(20):
        step = request("rpc_inference", next_servers=[(caller.peer, str(uuid.uuid4()), 0, 2**62)])
        _, error = await caller.acall_collect("rpc_inference", step)
        errors += error is not None and "outside the model" in str(error)
    assert errors == 20
    return "20 steps refused before running"


def _declared_parts(shape: tuple, parts: int, part_bytes: int = 4 * MiB):
    """A forward_stream request that declares a tensor of `shape` and sends its buffer in parts, lazily."""
    header = runtime_pb2.Tensor(dtype="float32", size=list(shape), chunks=parts, buffer=bytes(part_bytes))
    meta = wire.pack_metadata({"args_structure": ((b"__T0",), {})})
    yield runtime_pb2.ExpertRequest(uid=UID, tensors=[header], metadata=meta)
    for _ in range(parts - 1):
        yield runtime_pb2.ExpertRequest(uid=UID, tensors=[runtime_pb2.Tensor(buffer=bytes(part_bytes))])


async def big_streams(caller: Caller) -> str:
    """Four streams of 256 MiB of hidden states at once (once: 2.9 GB of node memory)."""

    async def one():
        parts = _declared_parts((1, 1 << 20, 64), 64)
        try:
            await caller.swarm.call_stream(caller.peer, "rpc_forward_stream", parts, timeout=60)
        except Exception as e:
            return str(e)
        return "answered"

    outcomes = await asyncio.gather(*(one() for _ in range(4)))
    # the node answers with the error, then closes after a moment of dropping the rest: a client still
    # writing hundreds of MiB may see the reset before it reads the error
    errors = ("can need", "per peer", "reset", "Broken pipe")  # hivemind shortens long error texts in the middle
    assert all(any(s in o for s in errors) for o in outcomes), outcomes
    return f"4 streams refused, {sum('can need' in o or 'per peer' in o for o in outcomes)} clients read the error"


async def unread_session(caller: Caller) -> str:
    """A session whose client writes 100 large steps and never reads: the node stops reading its stream."""
    _, reader, writer = await caller.swarm.p2p.call_binary_stream_handler(
        PeerID.from_base58(caller.peer), PREFIX + "rpc_inference"
    )
    step = request("rpc_inference", tensors=[hidden(1, 2048), EMPTY, NO_HYPO], max_length=2048)
    later = [hidden(1, 2048), EMPTY, NO_HYPO]
    written = 0
    try:
        for i in range(100):
            message = step if i == 0 else next_step(step, later, start_from_position=0)
            framing.write_message(writer, message)
            await asyncio.wait_for(writer.drain(), 2.0)
            written += 1
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    return f"{written} of 100 steps of 512 KiB written before the node stopped reading"


async def inference_flood(caller: Caller) -> str:
    """40 inference streams at once, each writing 4 steps of 2 MiB before reading anything (320 MiB): the
    stream keeper reserves each message's bytes for the peer before reading it, so it holds a bounded
    part of them; the rest waits, then is refused."""
    step = request("rpc_inference", tensors=[hidden(1, MAX_TOKENS), EMPTY, NO_HYPO], max_length=MAX_TOKENS)
    later = [hidden(1, MAX_TOKENS), EMPTY, NO_HYPO]

    async def one() -> str:
        _, reader, writer = await caller.swarm.p2p.call_binary_stream_handler(
            PeerID.from_base58(caller.peer), PREFIX + "rpc_inference"
        )
        try:
            for i in range(4):
                framing.write_message(writer, step if i == 0 else next_step(step, later, start_from_position=0))
                await asyncio.wait_for(writer.drain(), 10.0)
            marker, _ = await asyncio.wait_for(framing.read_frame(reader), 30.0)
            return "error" if marker == framing.ERROR else "answered"
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            return type(e).__name__
        finally:
            writer.close()

    outcomes = await asyncio.gather(*(one() for _ in range(40)))
    return ", ".join(f"{outcomes.count(o)} {o}" for o in sorted(set(outcomes)))


async def push_flood(caller: Caller) -> str:
    """200 pushes into one open session (once: an unbounded queue)."""
    session_id = str(uuid.uuid4())
    queue: asyncio.Queue = asyncio.Queue()

    async def feed():
        while (item := await queue.get()) is not None:
            yield item

    stream = await caller.swarm.p2p.iterate_protobuf_handler(
        PeerID.from_base58(caller.peer), PREFIX + "rpc_inference", feed(), runtime_pb2.ExpertResponse
    )
    first = request("rpc_inference", session_id=session_id, max_length=8)
    queue.put_nowait(first)
    await stream.__anext__()

    async def push_one() -> str:
        push = request("rpc_push", tensors=[hidden(1, 1), EMPTY, NO_HYPO], session_id=session_id, drop=["max_length"])
        try:
            await caller.swarm.call_unary(caller.peer, "rpc_push", push, runtime_pb2.ExpertResponse, timeout=10)
            return "taken"
        except Exception as e:
            return str(e)

    # at once, as a flood comes: one at a time, each may be taken before the next arrives
    outcomes = await asyncio.gather(*(push_one() for _ in range(200)))
    refused = sum("steps waiting" in o for o in outcomes)
    queue.put_nowait(runtime_pb2.ExpertRequest())
    queue.put_nowait(None)
    try:
        async for _ in stream:
            pass
    except Exception:
        pass  # the session may end with the client's own error
    others = collections.Counter(o[:200] for o in outcomes if o != "taken" and "steps waiting" not in o)
    assert refused > 0, dict(others)
    return f"{refused} of 200 pushes refused by the session's queue"


async def declared_expansion(caller: Caller) -> str:
    """8-bit tensors declaring 16M x 64 values, and float64 hidden states: refused before decoding."""
    quantized = runtime_pb2.Tensor(
        dtype="float32", size=[1, 1 << 24, 64], compression=runtime_pb2.QUANTILE_8BIT, buffer=bytes(1024)
    )
    forward = request("rpc_forward", tensors=[hidden()])
    del forward.tensors[:]
    forward.tensors.extend([quantized, enc(EMPTY)])
    _, error = await caller.acall_collect("rpc_forward", forward)
    assert error is not None and "max_batch_size" in str(error), error
    wide = request("rpc_forward", tensors=[hidden(1, 4, dtype=torch.float64), EMPTY])
    _, error64 = await caller.acall_collect("rpc_forward", wide)
    assert error64 is not None and "float64" in str(error64)
    return "refused by declared shape and dtype"


async def session_flood(caller: Caller) -> str:
    """200 sessions opened at once by one peer, held open for 2 s."""
    feeds = [asyncio.Queue() for _ in range(200)]

    async def feed(q):
        while (item := await q.get()) is not None:
            yield item

    async def open_one(q):
        stream = await caller.swarm.p2p.iterate_protobuf_handler(
            PeerID.from_base58(caller.peer), PREFIX + "rpc_inference", feed(q), runtime_pb2.ExpertResponse
        )
        q.put_nowait(request("rpc_inference", tensors=[hidden(1, 1), EMPTY, NO_HYPO], max_length=1))
        try:
            await asyncio.wait_for(stream.__anext__(), 30)
            return "open", stream
        except Exception as e:
            return f"{type(e).__name__}: {e}", None  # a timeout's text is empty: its name tells

    opened = await asyncio.gather(*(open_one(q) for q in feeds))
    await asyncio.sleep(2.0)
    for q in feeds:
        q.put_nowait(runtime_pb2.ExpertRequest())
        q.put_nowait(None)
    for _, stream in opened:
        if stream is not None:
            try:
                async for _ in stream:
                    pass
            except Exception:
                pass
    served = sum(o == "open" for o, _ in opened)
    refused = sum("sessions open" in o for o, _ in opened)
    others = collections.Counter(o[:300] for o, _ in opened if o != "open" and "sessions open" not in o)
    assert served + refused == 200 and refused > 0, dict(others)
    return f"{served} sessions opened, {refused} refused at the per-peer limit"


async def forward_flood(caller: Caller) -> str:
    """48 forwards of --max_batch_size tokens at once, again and again for 6 s."""
    outcomes = {"answered": 0, "refused": 0, "other": 0}
    others: list[str] = []
    deadline = time.monotonic() + 6.0

    async def one():
        while time.monotonic() < deadline:
            try:
                await caller.swarm.forward(torch.randn(1, MAX_TOKENS, 64), 0, 4)
                outcomes["answered"] += 1
            except Exception as e:
                kind = "refused" if "in flight" in str(e) or "retry" in str(e) else "other"
                outcomes[kind] += 1
                if kind == "other":
                    others.append(f"{type(e).__name__}: {e}"[:150])

    await asyncio.gather(*(one() for _ in range(48)))
    seen = f"{outcomes['answered']} answered, {outcomes['refused']} refused, {outcomes['other']} other errors"
    return seen + (f" ({others[0]})" if others else "")


async def slow_sender(caller: Caller) -> str:
    """A stream frame that declares 1 MiB, sends 10 bytes and stalls (once: held up to request_timeout)."""
    _, reader, writer = await caller.swarm.p2p.call_binary_stream_handler(
        PeerID.from_base58(caller.peer), PREFIX + "rpc_forward_stream"
    )
    began = time.monotonic()
    writer.write(framing.MESSAGE + struct.pack(">Q", MiB) + bytes(10))
    await writer.drain()
    frames = []
    try:
        while True:
            frames.append(await asyncio.wait_for(framing.read_frame(reader), 30))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
    seconds = time.monotonic() - began
    assert frames and frames[-1][0] == framing.ERROR and b"did not arrive in time" in frames[-1][1], frames
    return f"refused after {seconds:.1f} s"


async def undecodable_error_frame(caller: Caller) -> str:
    """An error frame whose payload is not an RPCError (once: a traceback and no error frame)."""
    frames = await caller.araw_stream(
        "rpc_forward_stream", framing.ERROR + struct.pack(">Q", 9) + b"\xff" * 9 + framing.MESSAGE + bytes(8)
    )
    return f"stream ended cleanly with {len(frames)} frames"


# what the node must have logged as refusals during each attack: (reasons, at least how many of them)
REFUSALS = {
    "big_streams": (("request_size", "peer_bytes"), 4),  # too large, or waited too long for the peer's room
    "push_flood": (("session_queue",), 1),
    "session_flood": (("peer_sessions",), 1),
    "slow_sender": (("slow_sender",), 1),
}

ATTACKS: dict[str, Callable] = {
    "next_servers_span": next_servers_span,
    "big_streams": big_streams,
    "unread_session": unread_session,
    "inference_flood": inference_flood,
    "push_flood": push_flood,
    "declared_expansion": declared_expansion,
    "session_flood": session_flood,
    "forward_flood": forward_flood,
    "slow_sender": slow_sender,
    "undecodable_error_frame": undecodable_error_frame,
}


# --- running them ----------------------------------------------------------------------------------------


def bounds_of(client: Client) -> dict[str, float]:
    """Each honest request's bound on this node (module docstring), from its idle latency and the
    longest compute round."""
    idle: dict[str, list[float]] = {"forward": [], "step": []}
    for _ in range(20):
        client.run(honest_calls(client.swarm, idle))
    rounds = []
    for _ in range(3):
        began = time.monotonic()
        client.run(client.swarm.forward(torch.randn(1, MAX_TOKENS, 64), 0, 1))
        rounds.append(time.monotonic() - began)
    longest = min(rounds)
    p95 = {kind: statistics.quantiles(times[5:], n=20)[-1] for kind, times in idle.items()}
    print(
        f"reliability: idle p95 forward={p95['forward']:.3f} s step={p95['step']:.3f} s, longest round={longest:.3f} s"
    )
    return {kind: 2 * p95[kind] + 2 * longest + SLACK for kind in idle}


def attack_under_load(name: str, attacker: Caller, honest: Client, pids_of, bounds: dict, label: str = "") -> dict:
    """Run one attack while the honest client works; the figures of both, and the memory growth."""
    before = processes_memory(pids_of())[1]
    with PeakMemory(pids_of) as memory, Honest(honest) as load:
        time.sleep(0.5)
        began = time.monotonic()
        unexpected = None
        try:
            seen = attacker.run(ATTACKS[name](attacker), timeout=120)
        except AssertionError as e:  # the server did not refuse or bound it as the node must
            seen = unexpected = f"not refused as expected: {e}"[:600]
        except Exception as e:
            seen = f"attack ended with {type(e).__name__}: {e}"[:200]
        seconds = time.monotonic() - began
        time.sleep(0.5)
    figures = dict(
        seen=seen,
        seconds=round(seconds, 1),
        honest_requests=sum(len(t) for t in load.timings.values()),
        honest_failures=len(load.failures),
        **{f"{kind}_max": round(max(times, default=0.0), 3) for kind, times in load.timings.items()},
        **{f"{kind}_bound": round(bound, 3) for kind, bound in bounds.items()},
        growth_mib=round((memory.peak - before) / MiB, 1),
    )
    print(f"reliability: attack {label or name} " + " ".join(f"{k}={v!r}" for k, v in figures.items()), flush=True)
    figures["failures"] = load.failures
    figures["unexpected"] = unexpected
    return figures


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with NodeProcess(
        MICRO_LLAMA, tmp_path_factory.mktemp("hostile") / "node", "--num_handlers", "2", dht_prefix="micro-llama"
    ) as node:
        yield node


@pytest.fixture(scope="module")
def clients(node):
    honest, attacker = Client(node.maddrs, "micro-llama"), Client(node.maddrs, "micro-llama")
    try:
        yield honest, Caller(attacker, node)
    finally:
        honest.close()
        attacker.close()


@pytest.fixture(scope="module")
def bounds(clients):
    return bounds_of(clients[0])


def actors_of(node) -> dict:
    return {name: (a["pid"], a["restarts"]) for name, a in node.status["actors"].items()}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_is_refused_or_bounded_and_the_honest_client_is_served(node, clients, bounds, name):
    honest, attacker = clients
    actors = actors_of(node)
    refused_before = refusals(node)
    figures = attack_under_load(name, attacker, honest, node.all_pids, bounds)
    assert figures["unexpected"] is None, figures["unexpected"]
    assert not figures["failures"], figures["failures"][:3]
    assert figures["honest_requests"] > 0
    for kind, bound in bounds.items():
        assert figures[f"{kind}_max"] <= bound, f"an honest {kind} took {figures[f'{kind}_max']} s, bound {bound:.3f} s"
    assert figures["growth_mib"] * MiB < MEMORY_BOUND
    assert actors_of(node) == actors, "an actor was replaced"
    if name in REFUSALS:
        reasons, least = REFUSALS[name]
        after = refusals(node)
        assert sum(after.get(r, 0) - refused_before.get(r, 0) for r in reasons) >= least, after


@pytest.mark.parametrize("rpc", ["rpc_inference", "rpc_forward_stream"])
def test_streams_opened_while_their_handler_is_busy_are_all_answered(node, clients, rpc):
    """300 streams opened at once while the processes that accept them are stalled for half a second (as a
    busy process is): each gets an answer or the node's refusal, none a reset. With the accept queue hivemind
    leaves (100), p2pd's dials beyond it failed and those streams broke (node/frontend/backlog.py)."""
    _, attacker = clients
    pids = [node.actor_pid("keeper")]  # it accepts every stream (procs/keeper.py)

    async def one() -> str:
        call = request(rpc, tensors=[hidden(1, 1), EMPTY, NO_HYPO], max_length=1)  # a session id each
        try:
            responses, error = await attacker.acall_collect(rpc, [call] if rpc == "rpc_inference" else call)
        except Exception as e:  # a reset stream: what must not happen
            return f"lost: {type(e).__name__}: {e}"[:150]
        if error is not None:
            return f"refused: {str(error)[-80:]}"  # the node's own answer, e.g. the per-peer session limit
        return "answered" if responses else "lost: an empty reply"

    async def flood() -> list[str]:
        tasks = [asyncio.ensure_future(one()) for _ in range(300)]
        await asyncio.sleep(0.5)  # the dials reach p2pd while nobody accepts them
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        return await asyncio.gather(*tasks)

    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        outcomes = attacker.run(flood(), timeout=120)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    counts = collections.Counter(outcomes)
    print(f"reliability: {rpc} streams opened while stalled: {dict(counts)}")
    assert counts["answered"] > 0 and not any(o.startswith("lost") for o in counts), dict(counts)


def refusals(node) -> dict:
    """The refusals the node has logged so far, by reason."""
    counts: dict = {}
    for event in node.log_events():
        if event.get("event") == "refused":
            counts[event["reason"]] = counts.get(event["reason"], 0) + 1
    return counts


def test_the_node_still_computes_exactly_what_transformers_does(node, clients, micro_hf):
    from tests.helpers.reference import hf_blocks, rel_err

    honest, _ = clients
    x = torch.randn(2, 7, 64)
    assert rel_err(honest.forward(x, 0, 4), hf_blocks(micro_hf, x, 0, 4)) <= 1e-5
