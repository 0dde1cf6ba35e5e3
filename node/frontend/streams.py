"""Stream RPCs on the frontend: hivemind's framing of protobuf streams (PROTOCOL 1.2), read with bounds.

`stream_handler` wraps a stream RPC of node/frontend/rpcs.py (rpc_inference, whose frames the stream keeper
relays through node/frontend/kept.py; it takes a p2pd stream's reader and writer just the same): it
reads the client's frames into a bounded queue (at most PREFETCH unread), parses each as an
ExpertRequest, writes the handler's responses, and turns malformed input into an error frame instead of
a dropped stream. When the reply is complete early (an error), the rest of the client's input is read
and dropped for a moment, so that closing the stream does not reset it before the error arrives. After an
error frame the stream stays open until the client closes it, and a complete reply is closed a grace after
its last frame (longer while the same peer has many streams open here: `close_grace`): p2pd may turn our
close into a reset that loses the last frame (see `drain_input`).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Callable, Optional

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from node.frontend.kept import KeptContext
from node.frontend.limits import Refused, Scopes
from node.frontend.time_limit import within
from protocol import stream_framing as framing

PREFETCH = 5  # like hivemind: at most this many unread requests buffered per stream
INPUT_DRAIN_SECONDS = 1.0  # after our last frame, how long to read (and drop) the rest of the client's input
DRAIN_BYTES = 64 << 20  # ... and how much of it at most
DRAIN_CHUNK = 64 << 10
FRAME_SECONDS = 10.0  # a frame's payload must arrive within this, plus a second per MiB (a body read timeout)
MIN_RATE = 1 << 20  # bytes per second
# What one frame costs beyond its payload (its objects, its parse, its place in a relayed call), counted
# against the limits with it: otherwise empty or 2-byte parts would be nearly free, and one forward stream of
# millions of them would hold hundreds of MB and the reading process's loop. A real request has a few parts.
FRAME_OVERHEAD = 1024
# A reply the client reads to its end is ended by our close, which may turn into a reset (see drain_input)
# that drops what the client's daemon has not yet passed on: this long after our last frame it has (under
# a load of 5 busy threads on 2 cores: 17 of 10000 replies lost at once, 2 after 5 ms, none after 20 ms).
CLOSE_GRACE = 0.02
# A client's daemon that receives many replies at once passes each on later: 300 streams of one peer answered
# together on 2 cores lost about 1 reply in 600 at 20 ms. Every STREAMS_PER_GRACE more streams of the same
# peer open here add one CLOSE_GRACE, up to CLOSE_GRACE_MAX (the client waits for our close to end its call).
STREAMS_PER_GRACE = 4
CLOSE_GRACE_MAX = 0.5
_open_streams: collections.Counter = collections.Counter()  # peer -> its streams this process is handling


def close_grace(peer: str) -> float:
    """How long after a complete reply's last frame its stream is closed."""
    others = max(0, _open_streams[peer] - 1)
    return min(CLOSE_GRACE_MAX, CLOSE_GRACE * (1 + others / STREAMS_PER_GRACE))


def stream_opened(peer: str) -> None:
    """A stream of `peer` is handled by this process from now on (see close_grace)."""
    _open_streams[peer] += 1


def stream_closed(peer: str) -> None:
    _open_streams[peer] -= 1
    if _open_streams[peer] <= 0:
        del _open_streams[peer]


async def read_bounded(
    reader: asyncio.StreamReader,
    reservation: "Reservation",
    rpc: str,
    received: int,
    message_limit: int,
    total_limit: Optional[int],
) -> tuple[bytes, bytes, int]:
    """(marker, payload, bytes counted) of a stream's next frame: refused before its payload is read if it is
    over `message_limit`, or takes the request (`received` bytes counted so far) over `total_limit` (None:
    none); reserved, then read within FRAME_SECONDS plus a second per MiB. A frame counts its payload and
    FRAME_OVERHEAD."""
    marker, length = await framing.read_header(reader)
    if length > message_limit:
        raise Refused("message_size", f"a stream message of {length} bytes exceeds the limit of {message_limit}")
    counted = length + FRAME_OVERHEAD
    if total_limit is not None and received + counted > total_limit:
        raise Refused(
            "request_size",
            f"the request exceeds {total_limit} bytes (each part counted with {FRAME_OVERHEAD} bytes of "
            f"overhead), the most a {rpc} request can need",
        )
    await reservation.reserve(counted)
    try:
        payload = await within(reader.readexactly(length), FRAME_SECONDS + length / MIN_RATE)
    except asyncio.TimeoutError:
        raise Refused("slow_sender", f"a stream message of {length} bytes did not arrive in time") from None
    return marker, payload, counted


def client_error_text(payload: bytes) -> Optional[str]:
    """The text of an error frame a client sent; None for its end-of-input."""
    try:
        return framing.error_text(payload)
    except Exception:  # an error frame whose payload is not an RPCError
        return f"an undecodable error frame of {len(payload)} bytes"


class Reservation:
    """The bytes one stream holds in the frontend's and its peer's scopes (node/frontend/limits.py).
    Each message's bytes are reserved before it is read and released by `release` once it is handled
    (an inference step), or when the stream ends."""

    def __init__(self, scopes: Scopes, peer: str):
        self.scopes = scopes
        self.peer = peer
        self.held = 0

    async def reserve(self, nbytes: int) -> None:
        await self.scopes.reserve(self.peer, nbytes)
        self.held += nbytes

    def release(self, nbytes: int) -> None:
        nbytes = min(nbytes, self.held)
        self.held -= nbytes
        self.scopes.release(self.peer, nbytes)

    def close(self) -> None:
        self.release(self.held)


@dataclass(frozen=True)
class Received:
    """One message of a stream, and how to give back the bytes it holds."""

    request: runtime_pb2.ExpertRequest
    nbytes: int
    reservation: Reservation

    def release(self) -> None:
        self.reservation.release(self.nbytes)


def stream_handler(
    p2p: P2P, name: str, handler, log, sizes: Callable[[], tuple[int, Optional[int]]], scopes: Scopes, refuse
):
    """Serve one stream RPC with hivemind's framing, but answer malformed input with an error frame.

    The handler gets the stream's messages as Received. `sizes()` gives the most bytes one message and
    the whole stream (None: no total, a session) may hold; a frame over them, or one that does not fit
    the scopes, is refused with an error and nothing more is read. `refuse(reason, peer, message)`
    counts and logs a refusal."""

    async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kept=None) -> None:
        """`kept`: a stream the keeper holds (node/frontend/kept.py is then both `reader` and `writer`)."""
        if kept is None:
            context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
        else:
            context = KeptContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id, kept=kept)
        peer = str(stream_info.peer_id)
        reservation = Reservation(scopes, peer)
        inbox: asyncio.Queue = asyncio.Queue(PREFETCH)

        async def requests():
            while True:
                item = await inbox.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item

        async def process() -> bool:
            """Whether the reply ended with an error frame."""
            try:
                async for response in handler(requests(), context):
                    framing.write_message(writer, response)
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                log.info("stream ended without a reply: the client is gone", rpc=name, peer=peer, error=repr(e))
            except Exception as e:
                framing.write_error(writer, str(e) or type(e).__name__)
                try:
                    await writer.drain()
                except ConnectionError as gone:
                    log.info("stream ended before its error: the client is gone", rpc=name, peer=peer, error=repr(gone))
                    return False
                return True
            return False

        async def read_next() -> tuple[bytes, bytes, int]:
            """(marker, payload, bytes reserved) of the next frame, within the limits."""
            return await read_bounded(reader, reservation, name, received, *sizes())

        stream_opened(peer)
        task = asyncio.get_running_loop().create_task(process())
        receiving = True
        ended = False  # the client sent its end-of-input, closed, or sent what cannot be read any further
        received = 0  # bytes counted so far (read_bounded)
        receive = None
        try:
            while not task.done():
                if not receiving:
                    await task
                    break
                receive = asyncio.get_running_loop().create_task(read_next())
                await asyncio.wait({task, receive}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    break  # `receive` stays pending for drain_input
                done, receive = receive, None
                try:
                    marker, payload, nbytes = done.result()
                except (asyncio.IncompleteReadError, ConnectionError) as e:
                    ended = True
                    task.cancel()  # the client closed or died mid-call: stop its work, free its cache
                    log.info("stream input cut before its end: work cancelled", rpc=name, peer=peer, error=repr(e))
                    break
                except Refused as e:
                    refuse(e.reason, peer, str(e))
                    await inbox.put(ValueError(str(e)))
                    receiving = False  # nothing more is kept: the rest is only dropped (drain_input)
                    continue
                received += nbytes
                if marker == framing.MESSAGE:
                    request = runtime_pb2.ExpertRequest()
                    try:
                        request.ParseFromString(payload)
                    except Exception:
                        await inbox.put(ValueError(f"malformed ExpertRequest ({nbytes} bytes could not be parsed)"))
                        receiving = False
                        continue
                    await inbox.put(Received(request, nbytes, reservation))
                elif marker == framing.ERROR:
                    reservation.release(nbytes)
                    text = client_error_text(payload)
                    await inbox.put(None if text is None else ConnectionError(f"the client sent an error: {text}"))
                    ended = True
                    # The input is complete: nothing more is read, so that the input side closing now (a
                    # half-close, or p2pd ending its half of the pipe) cannot be taken for a client that left
                    # mid-call and cancel the reply being computed.
                    receiving = False
                else:
                    await inbox.put(ValueError(f"malformed stream frame (marker {marker!r})"))
                    receiving = False
            if task.done() and not task.cancelled() and kept is None:  # the keeper drains its own
                if task.exception() is None and task.result():
                    await drain_input(reader, receive, until_closed=True)
                    receive = None
                else:
                    if not ended:
                        await drain_input(reader, receive)
                        receive = None
                    await asyncio.sleep(close_grace(peer))
        except Exception:
            log.warning("stream handler failed", rpc=name, exc_info=True)
            task.cancel()
        finally:
            if receive is not None:
                receive.cancel()
            writer.close()
            try:
                if not task.done():
                    await asyncio.wait({task})  # the handler releases what it holds as it ends
            finally:
                reservation.close()
                stream_closed(peer)

    return handle


async def drain_input(
    reader: asyncio.StreamReader, receive: Optional[asyncio.Task], until_closed: bool = False
) -> None:
    """Our reply is complete (often an early error) but the client may still be sending: read and drop its
    input up to its end-of-input, for at most INPUT_DRAIN_SECONDS and DRAIN_BYTES, holding no more than
    one chunk of it at a time. Closing the stream with input still unread makes it a reset, and the
    client would then lose our last frames (the error message).

    `until_closed`: our last frame was an error, and the client closes the stream once it has read it;
    read until then. Closing first loses the error now and then even with all input read: p2pd ends a
    stream its handler closed with a close that races a reset of the same stream in its other direction
    (still open: hivemind's client never half-closes), and a reset makes the client's daemon drop what it
    has received and not yet passed on (seen under load: about 1 error in 1000 streams lost)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + INPUT_DRAIN_SECONDS
    dropped = 0

    async def before_deadline(awaitable):
        return await asyncio.wait_for(awaitable, max(0.0, deadline - loop.time()))

    try:
        if receive is not None:  # a frame being read when the reply ended: let it finish
            marker = (await before_deadline(receive))[0]
            receive = None
            if marker != framing.MESSAGE and not until_closed:
                return
        if until_closed:
            while dropped < DRAIN_BYTES:
                chunk = await before_deadline(reader.read(DRAIN_CHUNK))
                if not chunk:
                    return
                dropped += len(chunk)
            return
        while dropped < DRAIN_BYTES:
            marker, length = await before_deadline(framing.read_header(reader))
            if marker != framing.MESSAGE:
                return  # end-of-input (or an error or a bad frame: nothing more to read)
            while length > 0 and dropped < DRAIN_BYTES:
                chunk = await before_deadline(reader.read(min(length, DRAIN_CHUNK)))
                if not chunk:
                    return
                length -= len(chunk)
                dropped += len(chunk)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError, Refused):
        return
    finally:
        if receive is not None:
            receive.cancel()
