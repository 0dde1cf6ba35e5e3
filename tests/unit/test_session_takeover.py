"""A session taken over from a frontend that died (node/frontend/session.py, node/frontend/kept.py): the
steps the dead frontend answered are recorded again first, and a push cannot cut in among them."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace

import pytest
from hivemind.proto import runtime_pb2
from structlog.testing import CapturingLogger

from node.frontend.counters import Counters
from node.frontend.errors import SessionBusy
from node.frontend.kept import KeptStream
from node.frontend.open_sessions import OpenSessions
from node.frontend.runtime_link import RuntimeLink
from node.frontend.session import InferenceStream, SessionServices
from protocol import wire
from protocol.messages import Granted
from protocol.wire import RawTensor

PLAN = SimpleNamespace(
    session_timeout=600,
    step_timeout=60,
    request_timeout=30,
    max_alloc_timeout=60,
    hidden_size=4,
    torch_dtype="float32",
    dht_prefix="m",
    start_block=0,
    end_block=2,
    inference_max_length=64,
    max_batch_size=16,
    adapters=[],
    total_blocks=4,
    compression=0,
)


class Runtime:
    """Answers every step with zeros of its shape; records (position, step_id, positions) of each call."""

    generation = 0
    metas = staticmethod(RuntimeLink.metas)

    def __init__(self):
        self.calls: list[tuple[int, str, int]] = []

    def next_id(self) -> int:
        return 1

    async def call(self, msg, tensors, timeout, spent=None):
        self.calls.append((msg.position, msg.step, tensors[0].shape[1]))
        await asyncio.sleep(0.001)
        return [RawTensor("float32", tensors[0].shape, bytes(tensors[0].nbytes))]


class Allocator:
    def next_id(self) -> int:
        return 1

    def send(self, *args) -> None:
        pass

    async def request_surviving(self, make, frames=(), timeout=0):
        make()
        return SimpleNamespace(msg=Granted(1, 7, 10**9))


class Received:
    def __init__(self, request):
        self.request = request

    def release(self) -> None:
        pass


def step(i: int) -> runtime_pb2.ExpertRequest:
    """Step i of session S: one position of hidden states."""
    metadata = {"session_id": "S", "step_id": f"step{i}", **({"max_length": 64} if i == 1 else {})}
    tensors = [
        wire.encode_tensor(RawTensor("float32", (1, 1, 4), struct.pack("<4f", i, i, i, i))),
        wire.encode_tensor(RawTensor("float32", (0,), b"")),
        wire.encode_tensor(RawTensor("int64", (0,), b"")),
    ]
    return runtime_pb2.ExpertRequest(uid="m.0 m.1", tensors=tensors, metadata=wire.pack_metadata(metadata))


def taken_over(replayed: int) -> tuple[InferenceStream, Runtime]:
    """A session handed over after its first `replayed` steps were answered by a frontend that died."""
    runtime = Runtime()
    log = CapturingLogger()
    services = SessionServices(PLAN, log, Allocator(), runtime, OpenSessions(), Counters(log), None)
    kept = KeptStream(1, replayed, lambda msg, frames: None, handed_over=True)
    return InferenceStream(services, "peer", kept), runtime


async def collect(responses) -> list:
    return [response async for response in responses]


def test_a_push_while_the_history_is_recorded_again_is_refused():
    """Replayed steps 1 to 12, a push of step 13 arriving while step 8 is read: before, it ran at position 7
    and the client's own copy of step 13 was then dropped as its duplicate."""
    refused = []

    async def client():
        for i in range(1, 14):  # the replayed 1..12, then the client's own step 13
            if i == 8:
                with pytest.raises(SessionBusy, match="being taken over") as e:
                    session.push(step(13))
                refused.append(e.value)
            yield Received(step(i))
            await asyncio.sleep(0)

    async def main():
        nonlocal session, runtime
        session, runtime = taken_over(12)  # made in the loop that serves it (its stream's reader)
        return await collect(session.run(client()))

    session = runtime = None
    answers = asyncio.run(main())
    assert refused and len(answers) == 1
    assert runtime.calls == [(0, "step13", 13)]  # the history and the step, in order, in one prefill
    assert session.prefix == 13 and session.history.length == 13


def test_a_push_once_the_history_is_recorded_again_is_taken():
    """The refusal lasts only while replayed steps wait: then a push runs at the session's position, and the
    client's own copy of the step is dropped as its duplicate."""

    async def client():
        for i in range(1, 4):
            yield Received(step(i))
        await replayed.wait()
        yield Received(step(4))  # the client's own copy, after the push

    async def main():
        nonlocal session, runtime, replayed
        session, runtime = taken_over(3)
        replayed = asyncio.Event()
        serving = asyncio.get_running_loop().create_task(collect(session.run(client())))
        while session.client_messages < 3:
            await asyncio.sleep(0.001)
        session.push(step(4))
        replayed.set()
        return await serving

    session = runtime = replayed = None
    answers = asyncio.run(main())
    assert runtime.calls == [(0, "step4", 4)] and len(answers) == 1
