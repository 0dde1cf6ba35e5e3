"""How the frontend's stream handler ends a stream (node/frontend/streams.py), over a real socket pair.

p2pd turns a handler's close into a close that races a reset of the stream, and a reset makes the client's
daemon drop what it has not yet passed on: the reply's last frame, or the error. So after an error frame
the handler waits for the client (who stops reading at an error) to close first, and after a complete
reply it closes only CLOSE_GRACE later. Both are bounded: a client that never closes is closed on.
"""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace

import pytest
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from structlog.testing import CapturingLogger

from node.frontend import streams
from node.frontend.limits import Scopes
from protocol import stream_framing as framing

PEER = PeerID.from_base58("QmWUBfS8Y8VeN6HEFXqZEwN6nrk2mxZELwpy7TuJLdU7oe")


async def failing(requests, context):
    async for _ in requests:
        raise ValueError("Remote peer does not serve x.0")
    yield  # an async generator, like the node's stream RPCs


async def answering(requests, context):
    async for received in requests:
        yield runtime_pb2.ExpertResponse(metadata=received.request.metadata)
        received.release()


async def serve_one(handler, log: CapturingLogger):
    """(the handler's task, the client's reader and writer) for one stream over a unix socket pair."""
    ours, theirs = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=ours)
    client_reader, client_writer = await asyncio.open_connection(sock=theirs)
    handle = streams.stream_handler(
        SimpleNamespace(peer_id=PEER),
        "rpc_forward_stream",
        handler,
        log,
        lambda: (1 << 20, 1 << 22),
        Scopes(1 << 24, 1 << 23),
        lambda reason, peer, message: None,
    )
    task = asyncio.get_running_loop().create_task(handle(SimpleNamespace(peer_id=PEER), server_reader, server_writer))
    return task, client_reader, client_writer


def send_request(writer) -> None:
    """What hivemind's client sends: the request, then its end-of-input marker."""
    framing.write_message(writer, runtime_pb2.ExpertRequest(uid="x.0", metadata=b"m"))
    framing.end_of_stream(writer)


async def closed_within(reader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except asyncio.TimeoutError:
        return False


def test_after_an_error_the_stream_stays_open_until_the_client_closes():
    async def main():
        log = CapturingLogger()
        task, reader, writer = await serve_one(failing, log)
        send_request(writer)
        marker, payload = await asyncio.wait_for(framing.read_frame(reader), 5)
        assert marker == framing.ERROR and "does not serve" in framing.error_text(payload)
        assert not await closed_within(reader, 0.3), "the handler closed before the client had closed"
        assert not task.done()
        began = time.monotonic()
        writer.close()  # as hivemind's client does once it has read the error
        await asyncio.wait_for(task, 5)
        return time.monotonic() - began, [call.args[0] for call in log.calls]

    seconds, events = asyncio.run(main())
    assert seconds < 0.5, f"the handler took {seconds:.2f} s to end after the client closed"
    assert "stream handler failed" not in events


def test_after_an_error_a_client_that_never_closes_is_closed_on(monkeypatch):
    monkeypatch.setattr(streams, "INPUT_DRAIN_SECONDS", 0.3)

    async def main():
        task, reader, writer = await serve_one(failing, CapturingLogger())
        send_request(writer)
        marker, _ = await asyncio.wait_for(framing.read_frame(reader), 5)
        assert marker == framing.ERROR
        began = time.monotonic()
        assert await closed_within(reader, 5), "the handler never closed the stream"
        await asyncio.wait_for(task, 5)
        writer.close()
        return time.monotonic() - began

    assert asyncio.run(main()) >= 0.2


@pytest.mark.parametrize("grace", [0.0, 0.5])
def test_a_complete_reply_is_closed_a_grace_after_its_last_frame(monkeypatch, grace):
    monkeypatch.setattr(streams, "CLOSE_GRACE", grace)

    async def main():
        task, reader, writer = await serve_one(answering, CapturingLogger())
        send_request(writer)
        marker, payload = await asyncio.wait_for(framing.read_frame(reader), 5)
        assert marker == framing.MESSAGE and runtime_pb2.ExpertResponse.FromString(payload).metadata == b"m"
        received = time.monotonic()
        assert await closed_within(reader, 5), "the handler never closed a complete reply"
        gap = time.monotonic() - received
        await asyncio.wait_for(task, 5)
        writer.close()
        return gap

    gap = asyncio.run(main())
    if grace:
        assert gap >= grace / 2, f"closed {gap:.3f} s after the last frame, before the grace of {grace} s"
    else:
        assert gap < 0.5


def test_the_grace_grows_with_the_streams_the_same_peer_has_open_and_is_bounded(monkeypatch):
    monkeypatch.setattr(streams, "_open_streams", streams.collections.Counter())
    streams._open_streams["a"] = 1
    assert streams.close_grace("a") == streams.CLOSE_GRACE
    streams._open_streams["a"] = 1 + streams.STREAMS_PER_GRACE
    streams._open_streams["b"] = 1
    assert streams.close_grace("a") == pytest.approx(2 * streams.CLOSE_GRACE)
    assert streams.close_grace("b") == streams.CLOSE_GRACE  # another peer's streams do not delay this one's
    streams._open_streams["a"] = 10_000
    assert streams.close_grace("a") == streams.CLOSE_GRACE_MAX


def test_a_handler_counts_its_stream_while_it_runs_and_forgets_it_after(monkeypatch):
    monkeypatch.setattr(streams, "_open_streams", streams.collections.Counter())
    seen = []

    async def counting(requests, context):
        async for _ in requests:
            seen.append(dict(streams._open_streams))
            yield runtime_pb2.ExpertResponse(metadata=b"m")
            return

    async def main():
        task, reader, writer = await serve_one(counting, CapturingLogger())
        send_request(writer)
        await asyncio.wait_for(framing.read_frame(reader), 5)
        assert await closed_within(reader, 5)
        await asyncio.wait_for(task, 5)
        writer.close()

    asyncio.run(main())
    assert seen == [{str(PEER): 1}] and not streams._open_streams
