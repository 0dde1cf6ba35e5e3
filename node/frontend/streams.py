"""Stream RPCs on the frontend: hivemind's framing of protobuf streams (PROTOCOL 1.2), read with bounds.

`stream_handler` wraps one of node/frontend/handlers.py's stream RPCs as a p2pd binary stream handler: it
reads the client's frames into a bounded queue (at most PREFETCH unread), parses each as an
ExpertRequest, writes the handler's responses, and turns malformed input into an error frame instead of
a dropped stream. When the reply is complete early (an error), the rest of the client's input is read
and dropped for a moment, so that closing the stream does not reset it before the error arrives.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from protocol import streams

PREFETCH = 5  # like hivemind: at most this many unread requests buffered per stream


INPUT_DRAIN_SECONDS = 1.0  # after our last frame, how long to wait for the rest of the client's input


def stream_handler(p2p: P2P, name: str, handler, log):
    """Serve one stream RPC with hivemind's framing, but answer malformed input with an error frame."""

    async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
        inbox: asyncio.Queue = asyncio.Queue(PREFETCH)

        async def requests():
            while True:
                item = await inbox.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item

        async def process() -> None:
            try:
                async for response in handler(requests(), context):
                    streams.write_message(writer, response)
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the client is gone; nobody to tell
            except Exception as e:
                streams.write_error(writer, str(e) or type(e).__name__)
                await writer.drain()

        task = asyncio.get_running_loop().create_task(process())
        receiving = True
        ended = False  # the client sent its end-of-input, closed, or sent what cannot be read any further
        receive = None
        try:
            while not task.done():
                if not receiving:
                    await task
                    break
                receive = asyncio.get_running_loop().create_task(streams.read_frame(reader))
                await asyncio.wait({task, receive}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    break  # `receive` stays pending for drain_input
                received, receive = receive, None
                try:
                    marker, payload = received.result()
                except (asyncio.IncompleteReadError, ConnectionError):
                    ended = True
                    task.cancel()  # the client closed or died mid-call: stop its work, free its cache
                    break
                except streams.FrameTooLarge as e:
                    await inbox.put(ValueError(str(e)))
                    receiving = False
                    continue
                if marker == streams.MESSAGE:
                    request = runtime_pb2.ExpertRequest()
                    try:
                        request.ParseFromString(payload)
                    except Exception:
                        await inbox.put(
                            ValueError(f"malformed ExpertRequest ({len(payload)} bytes could not be parsed)")
                        )
                        receiving = False
                        continue
                    await inbox.put(request)
                elif marker == streams.ERROR:
                    text = streams.error_text(payload)
                    await inbox.put(None if text is None else ConnectionError(f"the client sent an error: {text}"))
                    ended = True
                else:
                    await inbox.put(ValueError(f"malformed stream frame (marker {marker!r})"))
                    receiving = False
            if receiving and not ended and task.done() and not task.cancelled():
                await drain_input(reader, receive)
                receive = None
        except Exception:
            log.warning("stream handler failed", rpc=name, exc_info=True)
            task.cancel()
        finally:
            if receive is not None:
                receive.cancel()
            writer.close()

    return handle


async def drain_input(reader: asyncio.StreamReader, receive: Optional[asyncio.Task]) -> None:
    """Our reply is complete (often an early error) but the client may still be sending: read and drop its
    frames up to its end-of-input, for at most INPUT_DRAIN_SECONDS. Closing the stream with input still
    unread makes it a reset, and the client may then lose our last frames (the error message)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + INPUT_DRAIN_SECONDS
    try:
        while True:
            receive = receive or loop.create_task(streams.read_frame(reader))
            marker, _ = await asyncio.wait_for(receive, max(0.0, deadline - loop.time()))
            receive = None
            if marker != streams.MESSAGE:
                return  # end-of-input (or an error or a bad frame: nothing more to read)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
        return
    finally:
        if receive is not None:
            receive.cancel()
