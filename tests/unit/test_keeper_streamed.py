"""A forward or backward stream held by the stream keeper (node/keeper/streamed.py), over a real socket pair:
its request read whole and within the limits, asked of a frontend once complete, the reply written in its
parts, and every refusal answered with an error frame at once."""

from __future__ import annotations

import asyncio
import socket
import struct

from hivemind.proto import runtime_pb2
from structlog.testing import CapturingLogger

from node.frontend import streams
from node.frontend.limits import Scopes
from node.keeper import streamed
from protocol import stream_framing as framing
from protocol.messages import SHUTTING_DOWN

PEER = "QmWUBfS8Y8VeN6HEFXqZEwN6nrk2mxZELwpy7TuJLdU7oe"


def part(text: str) -> bytes:
    return runtime_pb2.ExpertRequest(uid="x.0", metadata=text.encode()).SerializeToString()


class Served:
    """One stream: the client's ends, what `ask` was given, the refusals and the scopes."""

    def __init__(self, ask=None, limits=streamed.Limits(1 << 16, 1 << 17, 5.0)):
        self.asked: list[list[bytes]] = []
        self.refused: list[tuple[str, str]] = []
        self.scopes = Scopes(1 << 24, 1 << 23)
        self.held_while_asked = 0
        self.ask_with = ask
        self.limits = limits
        self.log = CapturingLogger()

    async def ask(self, frames: list[bytes]) -> list[bytes]:
        self.asked.append(frames)
        self.held_while_asked = self.scopes.used
        if self.ask_with is not None:
            return await self.ask_with(frames)
        return [b"reply-" + bytes([i]) for i in range(len(frames))]

    async def start(self, stopping: asyncio.Future):
        ours, theirs = socket.socketpair()
        server_reader, server_writer = await asyncio.open_connection(sock=ours)
        self.reader, self.writer = await asyncio.open_connection(sock=theirs)
        self.task = asyncio.get_running_loop().create_task(
            streamed.serve(
                "rpc_forward_stream",
                PEER,
                server_reader,
                server_writer,
                limits=self.limits,
                scopes=self.scopes,
                ask=self.ask,
                refuse=lambda reason, peer, detail: self.refused.append((reason, detail)),
                stopping=stopping,
                log=self.log,
            )
        )

    async def frames(self, seconds: float = 5.0) -> list[tuple[bytes, bytes]]:
        """What the server writes until it closes (or until its error frame: then the client closes)."""
        got = []
        while True:
            try:
                got.append(await asyncio.wait_for(framing.read_frame(self.reader), seconds))
            except asyncio.IncompleteReadError:
                return got
            if got[-1][0] == framing.ERROR:
                self.writer.close()
                return got


def run(body, **options):
    """`body(served, stopping)` as the client of one stream served with `options` (Served's)."""

    async def main():
        stopping = asyncio.get_running_loop().create_future()
        served = Served(**options)
        await served.start(stopping)
        result = await body(served, stopping)
        await asyncio.wait_for(served.task, 5)
        return served, result

    return asyncio.run(main())


def test_a_complete_request_is_asked_once_whole_and_its_reply_written_in_parts():
    async def body(served, stopping):
        framing.write_frame(served.writer, framing.MESSAGE, part("a"))
        await asyncio.sleep(0.1)
        assert served.asked == []  # not before the last part
        framing.write_frame(served.writer, framing.MESSAGE, part("b"))
        framing.end_of_stream(served.writer)
        return await served.frames()

    served, frames = run(body)
    assert served.asked == [[part("a"), part("b")]] and served.task.result() is False
    assert frames == [(framing.MESSAGE, b"reply-\x00"), (framing.MESSAGE, b"reply-\x01")]
    # each frame counts FRAME_OVERHEAD beside its payload: the two parts and the end-of-input
    counted = len(part("a")) + len(part("b")) + 3 * streams.FRAME_OVERHEAD
    assert served.held_while_asked == counted and served.scopes.used == 0


def test_a_part_that_does_not_parse_is_answered_at_once():
    async def body(served, stopping):
        framing.write_frame(served.writer, framing.MESSAGE, b"\xff\xff\xff\xff\xff\x07garbage")
        return await served.frames()  # no end-of-input sent

    served, frames = run(body)
    assert len(frames) == 1 and "malformed ExpertRequest" in framing.error_text(frames[0][1])
    assert served.asked == [] and served.scopes.used == 0


def test_a_part_over_the_limits_is_refused_with_its_reason():
    async def body(served, stopping):
        served.writer.write(framing.MESSAGE + struct.pack(">Q", 1 << 20))
        return await served.frames()

    served, frames = run(body)
    assert len(frames) == 1 and "exceeds the limit" in framing.error_text(frames[0][1])
    assert [reason for reason, _ in served.refused] == ["message_size"]


def test_a_request_over_its_total_is_refused():
    async def body(served, stopping):
        for _ in range(3):
            framing.write_frame(served.writer, framing.MESSAGE, part("a" * 60_000))
        return await served.frames()

    served, frames = run(body)
    assert frames[-1][0] == framing.ERROR and "the most a rpc_forward_stream request can need" in framing.error_text(
        frames[-1][1]
    )
    assert [reason for reason, _ in served.refused] == ["request_size"] and served.asked == []


def test_a_request_still_arriving_when_the_keeper_stops_gets_the_shutting_down_error():
    async def body(served, stopping):
        framing.write_frame(served.writer, framing.MESSAGE, part("a"))
        await asyncio.sleep(0.1)
        stopping.set_result(None)
        return await served.frames()

    served, frames = run(body)
    assert len(frames) == 1 and framing.error_text(frames[0][1]) == SHUTTING_DOWN and served.asked == []
    assert served.task.result() is True  # counted as cut by the stop


def test_a_request_that_does_not_arrive_in_time_is_refused():
    async def body(served, stopping):
        framing.write_frame(served.writer, framing.MESSAGE, part("a"))
        return await served.frames()

    served, frames = run(body, limits=streamed.Limits(1 << 16, 1 << 17, 0.3))
    assert len(frames) == 1 and "did not arrive within" in framing.error_text(frames[0][1])


def test_the_frontend_s_error_is_the_error_frame_s_text():
    async def fail(frames):
        raise ValueError("Remote peer does not serve x.0")

    async def body(served, stopping):
        framing.write_frame(served.writer, framing.MESSAGE, part("a"))
        framing.end_of_stream(served.writer)
        return await served.frames()

    served, frames = run(body, ask=fail)
    assert len(frames) == 1 and framing.error_text(frames[0][1]) == "Remote peer does not serve x.0"


def test_a_client_that_leaves_mid_request_gets_nothing_asked():
    async def body(served, stopping):
        framing.write_frame(served.writer, framing.MESSAGE, part("a"))
        served.writer.write(framing.MESSAGE + struct.pack(">Q", 100) + b"half")
        await served.writer.drain()
        served.writer.close()
        return None

    served, _ = run(body)
    assert served.asked == [] and served.scopes.used == 0
    assert "stream input cut before its end" in [call.args[0] for call in served.log.calls]


def test_a_failure_reading_the_request_is_the_client_s_error_not_its_silence(monkeypatch):
    async def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(streamed, "read_request", broken)

    async def body(served, stopping):
        return await served.frames()

    served, frames = run(body)
    assert len(frames) == 1 and "the server failed to read this stream" in framing.error_text(frames[0][1])


def test_empty_parts_are_not_free():
    """Each part counts FRAME_OVERHEAD against the request's bound: a stream of empty (or 2-byte) parts once
    held 21 times what it reserved, and nothing bounded how many it sent."""

    async def body(served, stopping):
        for _ in range(200):
            framing.write_frame(served.writer, framing.MESSAGE, b"")  # an empty ExpertRequest parses
        return await served.frames()

    served, frames = run(body, limits=streamed.Limits(1 << 16, 1 << 17, 5.0))
    assert [reason for reason, _ in served.refused] == ["request_size"]
    assert len(frames) == 1 and "overhead" in framing.error_text(frames[0][1])
    assert served.asked == [] and served.scopes.used == 0


def test_a_reply_its_client_does_not_read_ends_the_stream_and_its_reservation(monkeypatch):
    """Its writes had no time limit: a client that sent a request and never read held its reservation (and
    the reply) for as long as its connection lived."""
    monkeypatch.setattr(streamed, "FRAME_SECONDS", 0.3)
    monkeypatch.setattr(streamed, "MIN_RATE", 1 << 40)  # the frame's time: FRAME_SECONDS alone

    async def big_reply(frames):
        return [b"x" * (16 << 20)]

    async def body(served, stopping):
        framing.write_frame(served.writer, framing.MESSAGE, part("a"))
        framing.end_of_stream(served.writer)
        await asyncio.wait_for(asyncio.shield(served.task), 10)  # the client reads nothing meanwhile

    served, _ = run(body, ask=big_reply)
    assert served.task.result() is False and served.scopes.used == 0
    assert "reply not read: stream closed" in [call.args[0] for call in served.log.calls]
