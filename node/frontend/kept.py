"""An rpc_inference stream held by the stream keeper (procs/keeper.py), as the frontend sees it.

The keeper owns the stream's p2pd connection and relays its frames; here they become the reader and the
writer that node/frontend/streams.py reads and writes for any stream, so that a kept stream is served by
the same code as any other. Besides, the session (node/frontend/session.py) tells the keeper through
this link how many of the client's messages it has handled and how much of them to log: if this
frontend dies, another one takes the stream over from that point (`replayed`: the messages it must only
record, not answer again).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from hivemind.p2p import P2PContext

from protocol import stream_framing as framing
from protocol.messages import Message, StreamDone, StreamHandled, StreamKeep, StreamOut

# the log may hold each message in float32 (what a client may send) where the history holds the node's dtype
LOG_SLACK_PER_TOKEN = 2048  # metadata and framing of a step, per position


@dataclass(frozen=True)
class KeptContext(P2PContext):
    kept: "KeptStream" = None


class KeptStream:
    def __init__(self, stream: int, replayed: int, send: Callable[[Message, list], None], handed_over: bool = False):
        self.stream = stream
        self.handed_over = handed_over  # from a frontend that died (which may have opened its session)
        self.replayed = replayed  # the first client messages, already answered by that frontend
        self.handled = 0  # client messages answered or dropped so far (including the replayed ones)
        self.compute_us = 0  # the runtime's compute for the reply being written (node/frontend/session.py)
        self._send = send
        self.reader = asyncio.StreamReader()
        self._out = bytearray()
        self._done = False
        self._input_ended = False

    # --- the keeper's side ---------------------------------------------------------------------

    def feed(self, marker: int, payload) -> None:
        if self._input_ended:  # a late frame of a keeper that died: its client is gone
            return
        payload = bytes(payload)
        self.reader.feed_data(framing.header(bytes([marker]), len(payload)) + payload)

    def feed_eof(self) -> None:
        self._input_ended = True
        self.reader.feed_eof()

    # --- the session's side --------------------------------------------------------------------

    def step_handled(self, answered: bool) -> None:
        """One more client message is handled; with no answer to write, the keeper is told now."""
        self.handled += 1
        if not answered:
            self._send(StreamHandled(self.stream, self.handled), [])

    def detach(self) -> None:
        """This process leaves the stream to the keeper's next frontend: nothing more is sent for it."""
        self._send = lambda msg, frames: None

    def keep(self, budget: int) -> None:
        self._send(StreamKeep(self.stream, max(0, budget)), [])

    # --- the writer that node/frontend/streams.py writes ---------------------------------------

    def write(self, data: bytes) -> None:
        self._out += data

    async def drain(self) -> None:
        self._flush()

    def _flush(self) -> None:
        """Each complete frame goes to the keeper, with the count of messages handled as of now."""
        out = self._out
        header = 1 + framing.HEADER_LEN
        while len(out) >= header:
            length = int.from_bytes(out[1:header], "big")
            if len(out) < header + length:
                break
            out_msg = StreamOut(self.stream, out[0], self.handled, self.compute_us)
            self._send(out_msg, [bytes(out[header : header + length])])
            self.compute_us = 0
            del out[: header + length]

    def close(self) -> None:
        if not self._done:
            self._flush()
            self._done = True
            self._send(StreamDone(self.stream), [])

    def is_closing(self) -> bool:
        return self._done


def log_budget(history_reserved: int, dtype_bytes: int, max_length: int) -> int:
    """What the keeper may log of a session whose history reservation is `history_reserved` bytes."""
    if history_reserved <= 0:
        return 0
    return history_reserved * 4 // dtype_bytes + max_length * LOG_SLACK_PER_TOKEN
