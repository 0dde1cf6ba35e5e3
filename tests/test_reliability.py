"""The reliability suite (marker `reliability`): soak, actors killed under load, fuzzed requests,
cache exhaustion. Short in CI; long with RELIABILITY_SECONDS (soak and kill phases, default 8) and
RELIABILITY_CASES (fuzz cases, default 150):

    RELIABILITY_SECONDS=600 RELIABILITY_CASES=20000 .venv/bin/python -m pytest -m reliability -s

Each test prints its figures (requests, faults injected, errors seen, crashes, memory growth) on a
line starting with "reliability:".
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import psutil
import pytest
import torch
from hivemind.proto import runtime_pb2

from node.client import Client
from node.launcher import NodeProcess
from protocol import wire
from tests.conftest import MICRO_LLAMA
from tests.test_bad_input import STREAMS, UNARY, Caller, request

SECONDS = float(os.environ.get("RELIABILITY_SECONDS", "8"))
CASES = int(os.environ.get("RELIABILITY_CASES", "150"))
STEP_TIMEOUT = 15.0  # a client's own timeout per step, as Petals clients have one

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(int(300 + 4 * SECONDS + CASES))]


def report(name: str, **figures) -> None:
    print(f"reliability: {name} " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def node_memory(node: NodeProcess) -> int:
    total = 0
    for pid in node.all_pids():
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


async def one_session(swarm, steps: int = 8, hidden: int = 64, metadata=None) -> None:
    async with swarm.inference_session(max_length=steps, start=0, end=4, metadata=metadata) as session:
        for _ in range(steps):
            out = await asyncio.wait_for(session.step(torch.randn(1, 1, hidden)), STEP_TIMEOUT)
            assert out.shape == (1, 1, hidden) and torch.isfinite(out).all()


class Load:
    """Client threads running inference sessions and forwards until stopped; every call is counted as
    a result, an error (with its text) or stuck (no answer within the client's timeout)."""

    def __init__(self, node: NodeProcess, threads: int):
        self.node = node
        self.stop = threading.Event()
        self.counts = {"results": 0, "errors": 0, "stuck": 0}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def count(self, what: str, text: str = "") -> None:
        with self.lock:
            self.counts[what] += 1
            if text and len(self.errors) < 20:
                self.errors.append(text[:200])

    def run(self, i: int) -> None:
        with Client(self.node.maddrs, self.node.dht_prefix) as client:
            while not self.stop.is_set():
                work = one_session(client.swarm) if i % 2 == 0 else client.swarm.forward(torch.randn(2, 16, 64), 0, 4)
                try:
                    client.run(work, timeout=STEP_TIMEOUT * 9)
                    self.count("results")
                except (TimeoutError, asyncio.TimeoutError) as e:
                    self.count("stuck", repr(e))
                except Exception as e:
                    self.count("errors", f"{type(e).__name__}: {e}")
                    time.sleep(0.2)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(STEP_TIMEOUT * 10)
        assert not any(t.is_alive() for t in self.threads), "a client call never ended"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with NodeProcess(MICRO_LLAMA, tmp_path_factory.mktemp("reliability") / "node", "--num_handlers", "2",
                     "--max_restarts", "1000", dht_prefix="micro-rel") as node:
        yield node


def restarts(node: NodeProcess) -> int:
    return sum(a["restarts"] for a in node.status["actors"].values())


def test_soak_memory_stays_bounded(node):
    with Client(node.maddrs, node.dht_prefix) as client:
        client.run(one_session(client.swarm))  # warm up
    before = node_memory(node)
    with Load(node, threads=4) as load:
        time.sleep(SECONDS)
    after = node_memory(node)
    growth = (after - before) / 2**20
    report("soak", seconds=SECONDS, requests=sum(load.counts.values()), **load.counts, crashes=restarts(node),
           memory_mib=round(after / 2**20), growth_mib=round(growth, 1))
    assert load.counts["errors"] == 0 and load.counts["stuck"] == 0, load.errors
    assert restarts(node) == 0
    assert growth < 64 + 4 * SECONDS / 60, f"node memory grew {growth:.1f} MiB in {SECONDS} s"


def test_fuzzed_requests_crash_nothing(node):
    rng = random.Random(1234)
    with Client(node.maddrs, node.dht_prefix) as client:
        caller = Caller(client, node)
        before = restarts(node)
        reference = client.forward(torch.ones(1, 3, 64), 0, 4)
        outcomes = {"answered": 0, "errors": 0, "timeouts": 0}
        for case in range(CASES):
            rpc = rng.choice(UNARY + STREAMS)
            try:
                if rng.random() < 0.3:
                    data = mutate_bytes(request(rpc).SerializeToString(), rng)
                    coro = caller.araw_unary(rpc, data) if rpc in UNARY else caller.araw_stream(rpc, data)
                else:
                    coro = caller.acall(rpc, mutate_request(request(rpc), rng))
                caller.run(asyncio.wait_for(coro, 10), timeout=30)
                outcomes["answered"] += 1
            except (TimeoutError, asyncio.TimeoutError):
                outcomes["timeouts"] += 1
            except Exception:
                outcomes["errors"] += 1
        crashes = restarts(node) - before
        report("fuzz", cases=CASES, **outcomes, crashes=crashes)
        assert crashes == 0
        assert torch.equal(client.forward(torch.ones(1, 3, 64), 0, 4), reference)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    choice = rng.random()
    if choice < 0.3 or not data:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
    if choice < 0.6:
        for _ in range(rng.randint(1, 10)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        return bytes(data)
    return bytes(data[: rng.randrange(len(data))])  # truncated


HOSTILE = [None, -1, 2**63, 1e308, float("nan"), "", "x" * 1000, [], {}, [1, "a", None], {"a": {"b": [1]}}, b"\x00\xff", True]


def mutate_request(req: runtime_pb2.ExpertRequest, rng: random.Random) -> runtime_pb2.ExpertRequest:
    """A valid protobuf with hostile contents: uid, metadata values, tensor dtypes, shapes, buffers."""
    out = runtime_pb2.ExpertRequest()
    out.CopyFrom(req)
    for _ in range(rng.randint(1, 3)):
        what = rng.choice(["uid", "metadata", "dtype", "size", "buffer", "drop", "extra"])
        if what == "uid":
            out.uid = rng.choice(["", " ", "micro-rel.0", "micro-llama.9", "micro-llama.-1", "micro-llama.0 micro-llama.0", "\x00" * 5, "a" * 5000])
        elif what == "metadata":
            meta = wire.unpack_metadata(out.metadata) if out.metadata else {}
            meta = meta if isinstance(meta, dict) else {}
            key = rng.choice(list(meta) + ["session_id", "max_length", "step_id", "start_from_position", "args_structure", "points", "alloc_timeout", "active_adapter"])
            meta[key] = rng.choice(HOSTILE)
            try:
                out.metadata = wire.pack_metadata(meta)
            except Exception:
                out.metadata = bytes(rng.getrandbits(8) for _ in range(20))
        elif out.tensors:
            tensor = out.tensors[rng.randrange(len(out.tensors))]
            if what == "dtype":
                tensor.dtype = rng.choice(["", "float64", "int8", "bool", "complex64", "float32\x00", "bfloat16"])
            elif what == "size":
                del tensor.size[:]
                tensor.size.extend(rng.choice([[], [0], [1, 1, 64], [2**31, 2**31], [1, 3, 65], [1] * 40]))
            elif what == "buffer":
                tensor.buffer = tensor.buffer[: rng.randrange(len(tensor.buffer) + 1)] + bytes(rng.randint(0, 8))
            elif what == "drop":
                del out.tensors[rng.randrange(len(out.tensors))]
            else:
                out.tensors.append(out.tensors[0])
    return out


def test_actors_killed_under_load_every_request_ends(tmp_path):
    with NodeProcess(MICRO_LLAMA, tmp_path / "kill", "--num_handlers", "2", "--max_restarts", "1000",
                     dht_prefix="micro-kill") as node:
        rng = random.Random(99)
        faults = 0
        with Load(node, threads=4) as load:
            deadline = time.monotonic() + max(SECONDS, 6)
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(1.0, 2.5))
                name = rng.choice(["runtime.0", "allocator", "frontend.0", "frontend.1", "announcer"])
                pid = node.status["actors"][name]["pid"]
                try:
                    os.kill(pid, signal.SIGKILL)
                    faults += 1
                except ProcessLookupError:
                    pass
                node.wait_ready(name, pid, timeout=30)
        node.wait_state("online", 30)
        with Client(node.maddrs, node.dht_prefix) as client:
            client.run(one_session(client.swarm), timeout=60)  # served again
        report("kill", seconds=max(SECONDS, 6), requests=sum(load.counts.values()), faults=faults, **load.counts,
               restarts=restarts(node), sample_errors=len(load.errors))
        assert load.counts["results"] > 0
        assert faults > 0 and restarts(node) >= faults


def test_cache_exhaustion_queues_then_times_out_cleanly(tmp_path):
    # room for two sessions of 8 tokens over 4 blocks; six clients want one each, waiting at most 1 s
    with NodeProcess(MICRO_LLAMA, tmp_path / "full", "--attn_cache_tokens", "32", dht_prefix="micro-full") as node:
        outcomes, lock = {"served": 0, "refused": 0, "other": []}, threading.Lock()

        def client_run():
            with Client(node.maddrs, node.dht_prefix) as client:
                try:
                    client.run(hold_session(client.swarm), timeout=60)
                    with lock:
                        outcomes["served"] += 1
                except Exception as e:
                    with lock:
                        if "Could not allocate" in str(e) or "allocate" in str(e).lower():
                            outcomes["refused"] += 1
                        else:
                            outcomes["other"].append(repr(e)[:200])

        async def hold_session(swarm):
            async with swarm.inference_session(max_length=8, start=0, end=4, metadata={"alloc_timeout": 1.0}) as session:
                for _ in range(4):
                    await asyncio.wait_for(session.step(torch.randn(1, 1, 64)), STEP_TIMEOUT)
                    await asyncio.sleep(0.5)  # hold the cache while others queue

        threads = [threading.Thread(target=client_run) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a client queued for cache forever"
        report("cache", clients=6, served=outcomes["served"], refused=outcomes["refused"], other=len(outcomes["other"]),
               crashes=restarts(node))
        assert not outcomes["other"], outcomes["other"]
        assert outcomes["served"] >= 2 and outcomes["refused"] >= 1
        assert restarts(node) == 0
