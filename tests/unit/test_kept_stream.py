"""An inference stream the stream keeper holds, as a frontend sees it (node/frontend/kept.py)."""

from __future__ import annotations

import asyncio

from node.frontend.kept import KeptStream
from protocol import stream_framing as framing


def test_frames_after_the_end_of_input_are_dropped():
    """A keeper that died leaves its last frames queued for the frontend after their streams were ended:
    feeding them raised (feed_data after feed_eof) in the loop that relays every keeper message."""

    async def main():
        sent = []
        stream = KeptStream(1, 0, lambda msg, frames: sent.append(msg))
        stream.feed(framing.MESSAGE[0], b"step")
        stream.feed_eof()
        stream.feed(framing.MESSAGE[0], b"late")
        first = await framing.read_frame(stream.reader)
        rest = await stream.reader.read()
        return first, rest

    first, rest = asyncio.run(main())
    assert first == (framing.MESSAGE, b"step") and rest == b""


def test_a_detached_stream_sends_nothing_more():
    """Once its keeper is gone, what the session still writes must not reach the keeper's replacement (which
    numbers its streams afresh: a StreamDone for number 1 would end its own stream 1)."""

    async def main():
        sent = []
        stream = KeptStream(1, 0, lambda msg, frames: sent.append(msg))
        stream.detach()
        stream.write(framing.header(framing.MESSAGE, 2) + b"ok")
        await stream.drain()
        stream.close()
        return sent

    assert asyncio.run(main()) == []
