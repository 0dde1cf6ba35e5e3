"""One rpc_forward_stream or rpc_backward_stream held by the stream keeper (procs/keeper.py): its request
read whole, within the limits, handed to `ask` (a frontend answers it, and another if that one dies:
node/keeper/calls.py), and the answer written back in its parts, or the error in an error frame.

A forward or backward stream is one request in parts (PROTOCOL 1.2, 3.5): nothing can be computed before
its last part, so reading it whole here costs no time, and the keeper can ask again when the frontend that
computes it dies, which a stream accepted by that frontend could not survive. Its bytes are reserved for
its peer and the keeper before each part is read, as a frontend does (node/frontend/streams.py), and the
stream is closed as there: after an error, once the client has closed (or a moment has passed); after a
complete reply, a grace after its last frame.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from hivemind.proto import runtime_pb2

from node.frontend.limits import Refused, Scopes
from node.frontend.streams import (
    FRAME_SECONDS,
    MIN_RATE,
    Reservation,
    client_error_text,
    close_grace,
    drain_input,
    read_bounded,
    stream_closed,
    stream_opened,
)
from node.frontend.time_limit import within
from protocol import stream_framing as framing
from protocol.messages import SHUTTING_DOWN


class ClientEnded(Exception):
    """The client ended its request with an error frame of its own: nothing is answered."""


@dataclass(frozen=True)
class Limits:
    message: int  # the most bytes one part may hold
    total: int  # ... and all parts together (the most the RPC can need on this node)
    seconds: float  # the time the whole request has to arrive (--request_timeout)


async def read_request(rpc: str, reader: asyncio.StreamReader, limits: Limits, reservation: Reservation) -> list[bytes]:
    """The request's messages (serialized ExpertRequests, each checked to parse: a frontend parses them
    again), up to the client's end-of-input."""
    frames: list[bytes] = []
    received = 0
    while True:
        marker, payload, counted = await read_bounded(reader, reservation, rpc, received, limits.message, limits.total)
        received += counted
        if marker == framing.MESSAGE:
            try:  # a part that cannot be parsed is answered at once, not after the rest of the request
                runtime_pb2.ExpertRequest.FromString(payload)
            except Exception:
                raise ValueError(f"malformed ExpertRequest ({len(payload)} bytes could not be parsed)") from None
            frames.append(payload)
        elif marker == framing.ERROR:
            text = client_error_text(payload)
            if text is None:
                return frames
            raise ClientEnded(f"the client sent an error: {text}")
        else:
            raise ValueError(f"malformed stream frame (marker {marker!r})")


async def written(writer: asyncio.StreamWriter, nbytes: int) -> bool:
    """Whether a frame of `nbytes` just written was taken by the client's side in the time a frame of that
    size has to arrive (FRAME_SECONDS plus a second per MiB): a client that does not read its reply would
    otherwise hold the request's reservation, and the reply, for as long as its connection lives."""
    try:
        await within(writer.drain(), FRAME_SECONDS + nbytes / MIN_RATE)
    except asyncio.TimeoutError:
        return False
    return True


async def serve(
    rpc: str,
    peer: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    limits: Limits,
    scopes: Scopes,
    ask: Callable[[list[bytes]], Awaitable[list[bytes]]],
    refuse: Callable[[str, str, str], None],
    stopping: asyncio.Future,
    log,
) -> bool:
    """One stream from its first byte to its close. `ask(frames)` gives the reply's messages or raises
    what the client is told (its str); `refuse(reason, peer, detail)` counts and logs a refusal; once
    `stopping` is done, a request still arriving is answered with the node's shutting-down error. True
    when that happened (the request was cut by the stop)."""
    reservation = Reservation(scopes, peer)
    stream_opened(peer)
    reading = asyncio.get_running_loop().create_task(read_request(rpc, reader, limits, reservation))
    try:
        done, _ = await asyncio.wait({reading, stopping}, timeout=limits.seconds, return_when=asyncio.FIRST_COMPLETED)
        error, cut = None, False
        if reading not in done:
            reading.cancel()
            await asyncio.wait({reading})  # its read ends before drain_input reads on
            cut = stopping.done()
            error = SHUTTING_DOWN if cut else f"the request did not arrive within {limits.seconds:.0f} s"
        else:
            try:
                frames = reading.result()
            except (asyncio.IncompleteReadError, ConnectionError, ClientEnded) as e:
                log.info("stream input cut before its end", rpc=rpc, peer=peer, error=repr(e))
                return False  # the client is gone, or ended the call itself: nobody reads an answer
            except Refused as e:
                refuse(e.reason, peer, str(e))
                error = str(e)
            except ValueError as e:
                error = str(e)
            except Exception as e:  # a bug here must end the stream with an error, not leave its client waiting
                log.error("stream reader failed", rpc=rpc, peer=peer, exc_info=e)
                error = f"the server failed to read this stream: {e!r}"
        if error is None:
            try:
                responses = await ask(frames)
            except Exception as e:
                error = str(e) or type(e).__name__
            else:
                del frames
                for response in responses:
                    framing.write_frame(writer, framing.MESSAGE, response)
                    if not await written(writer, len(response)):
                        log.info("reply not read: stream closed", rpc=rpc, peer=peer, bytes=len(response))
                        return False
                reservation.close()
                await asyncio.sleep(close_grace(peer))  # see node/frontend/streams.py CLOSE_GRACE
                return False
        framing.write_error(writer, error)
        if await written(writer, len(error)):
            await drain_input(reader, None, until_closed=True)  # closing first may lose the error
        return cut
    except (ConnectionError, OSError) as e:
        log.info("stream ended without a reply: the client is gone", rpc=rpc, peer=peer, error=repr(e))
        return False
    finally:
        reading.cancel()
        reservation.close()
        stream_closed(peer)
        writer.close()
