"""The stream keeper's reads and writes of one rpc_inference stream (procs/keeper.py), over a socket pair
instead of p2pd, with the frontend played by the test: a large reply does not stop the stream, and a client
that does not read its replies is not read from either."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from hivemind.proto import runtime_pb2  # noqa: F401 (the whole hivemind first: procs.keeper then keeps it)
from structlog.testing import CapturingLogger

from node.frontend.limits import Scopes
from node.keeper.table import WINDOW, Keeper
from procs import keeper as keeper_process
from protocol import stream_framing as framing
from protocol.messages import KeeperHello, StreamIn, StreamOut

PLAN = SimpleNamespace(hidden_size=64, max_batch_size=2048, start_block=0, end_block=4)


class Frontend(list):
    """What the keeper sends frontend.0: (message, frames)."""

    def __call__(self, frontend, msg, frames):
        self.append((msg, [bytes(f) for f in frames]))

    def steps(self) -> list[bytes]:
        return [frames[0] for msg, frames in self if isinstance(msg, StreamIn)]


def keeper(frontend: Frontend):
    k = object.__new__(keeper_process.KeeperProcess)
    k.plan, k.log = PLAN, CapturingLogger()
    k.actor = SimpleNamespace(probe=SimpleNamespace(active=False))
    k.table = Keeper(frontend, k.log)
    k.table.hello(KeeperHello("frontend.0", 100), now=0.0)
    k.connections, k.refused, k.steps = {}, {}, keeper_process.StepTimes()
    k.scopes = Scopes(1 << 30, 1 << 29)
    return k


async def until(predicate, seconds: float = 3.0) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def served(frontend: Frontend):
    """(the keeper, the handler's task, the client's reader and writer) for one stream."""
    k = keeper(frontend)
    ours, theirs = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    info = SimpleNamespace(peer_id="QmPeer")
    task = asyncio.get_running_loop().create_task(k.handle(info, server_reader, server_writer))
    return k, task, reader, writer


def test_the_next_step_is_read_after_a_reply_larger_than_the_write_buffer():
    """A reply written at once may leave more than WRITE_BUFFER in the transport: the next message must
    still be read once the client has taken it (an 8B-shape prefill's reply is 16 MiB). Here the reader
    waits (its frontend holds WINDOW unhandled messages) when the reply comes, and looks again then."""

    async def main():
        frontend = Frontend()
        k, task, reader, writer = await served(frontend)
        sent = [b"step%d" % i for i in range(WINDOW)]
        for step in sent:
            framing.write_frame(writer, framing.MESSAGE, step)
        assert await until(lambda: frontend.steps() == sent)
        stream_id = next(iter(k.connections))
        big = b"y" * (4 * keeper_process.WRITE_BUFFER)
        k.from_frontend("frontend.0", StreamOut(stream_id, framing.MESSAGE[0], WINDOW), [big])
        assert await asyncio.wait_for(framing.read_frame(reader), 5) == (framing.MESSAGE, big)
        framing.write_frame(writer, framing.MESSAGE, b"next")
        read_on = await until(lambda: frontend.steps() == sent + [b"next"])
        writer.close()
        await asyncio.wait_for(task, 5)
        return read_on

    assert asyncio.run(main())


def test_a_client_that_does_not_read_its_replies_is_read_no_further_then_cut(monkeypatch):
    """Its replies queued without bound while its next messages were read; now a reply waiting to be
    written stops the reading, and one not taken in time ends the stream (`slow_reader`)."""
    monkeypatch.setattr(keeper_process.streamed, "FRAME_SECONDS", 0.3)
    monkeypatch.setattr(keeper_process.streamed, "MIN_RATE", 1 << 40)

    async def main():
        frontend = Frontend()
        k, task, reader, writer = await served(frontend)
        framing.write_frame(writer, framing.MESSAGE, b"step1")
        assert await until(lambda: len(frontend.steps()) == 1)
        stream_id = next(iter(k.connections))
        big = b"y" * (4 * keeper_process.WRITE_BUFFER)
        for handled in (1, 1):  # the reply, then another frame that must wait for the client
            k.from_frontend("frontend.0", StreamOut(stream_id, framing.MESSAGE[0], handled), [big])
        # the keeper was already waiting for step 2 when the replies came; step 3 waits for them to be taken
        framing.write_frame(writer, framing.MESSAGE, b"step2")
        framing.write_frame(writer, framing.MESSAGE, b"step3")
        await asyncio.wait_for(task, 5)
        writer.close()
        return frontend.steps(), k.refused, k.scopes.used

    steps, refused, held = asyncio.run(main())
    assert steps == [b"step1", b"step2"] and refused == {"slow_reader": 1} and held == 0
