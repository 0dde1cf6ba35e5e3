"""The stream keeper's table: which frontend serves each rpc_inference stream, what its client has sent,
and who takes the stream over when its frontend dies (docs/reliability.md, "A frontend's crash").

The keeper process (procs/keeper.py) holds every rpc_inference stream's p2pd connection and moves its
frames; this table decides everything about them, with no socket and no clock of its own: it is told
what happened (a stream opened, a client message read, a frontend's frame, a frontend up or down) and
answers through `send(frontend, message, frames)` and through what its methods return.

A session's client messages are logged, up to the budget its frontend gives once the allocator has
granted the session (StreamKeep: twice its history reservation). When that frontend dies, the stream
is handed to another frontend (or to its replacement, once it says hello) with the log and the number
of messages already answered: the new frontend reopens the session, records what was answered, answers
the rest, and the client only sees a slower step.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from protocol import stream_framing as framing
from protocol.messages import (
    SHUTTING_DOWN,
    KeeperHello,
    Message,
    StreamDone,
    StreamHandled,
    StreamIn,
    StreamInEnd,
    StreamKeep,
    StreamOpen,
    StreamOut,
)

ERROR_MARKER = framing.ERROR[0]
MESSAGE_MARKER = framing.MESSAGE[0]
WINDOW = 4  # client messages a frontend may hold unhandled (a session queues at most QUEUED_STEPS)
FRONTEND_LOST = (
    "the node's frontend that held this session stopped, and the session could not be handed to another: "
    "{why}; open a new session"
)


@dataclass
class Stream:
    id: int
    peer: str
    frontend: Optional[str] = None  # who serves it; None while it waits for one
    log: list[tuple[int, bytes]] = field(default_factory=list)  # (marker, payload) of every client message
    log_bytes: int = 0
    budget: Optional[int] = None  # bytes the log may hold; None until the frontend says
    kept: bool = True  # whether a frontend's death can be hidden from the client
    why_not_kept: str = ""
    received: int = 0  # client messages read
    handled: int = 0  # ... of which answered (or dropped as duplicates) by a frontend
    input_ended: bool = False  # the client sent its end-of-input, or its connection was cut
    replied: bool = False  # an error frame went out: the reply is complete
    done: bool = False  # nothing more will be written
    waiting_since: Optional[float] = None  # when it lost its frontend (or came with none there)
    # (message number, when it was read) of messages not yet answered: a step's time in the node
    arrivals: collections.deque = field(default_factory=collections.deque)

    def forget(self, why: str) -> None:
        self.kept, self.why_not_kept = False, why
        self.log, self.log_bytes = [], 0

    def answering(self, handled: int) -> float:
        """When the message that a reply sent with `handled` answers was read; 0.0 for a later frame of
        that reply, or a reply to a message not read here (a push's, or one replayed to a new frontend)."""
        arrivals = self.arrivals
        while arrivals and arrivals[0][0] < handled:
            arrivals.popleft()
        if arrivals and arrivals[0][0] == handled:
            return arrivals.popleft()[1]
        return 0.0


@dataclass
class Frontend:
    name: str
    pid: int
    accepting: bool
    draining: bool


@dataclass(frozen=True)
class Write:
    """A frame for the stream's client."""

    marker: int
    payload: bytes
    compute_us: int = 0  # the runtime's compute for the step it answers
    since: float = 0.0  # when the client message it answers was read (perf_counter); 0: not timed
    handled: int = 0  # the client messages answered as of this frame (the probe matches a reply by it)


@dataclass(frozen=True)
class Close:
    """The reply is complete (or the stream must end with `error`, written first)."""

    error: Optional[str] = None


Action = Optional[object]  # Write, Close or None


def least_loaded(names: list[str], holders: Iterable[Optional[str]], turn: Iterator[int]) -> Optional[str]:
    """Of `names`, the frontend that holds the fewest of the things whose holders are `holders` (streams or
    calls), ties broken in turn; None if there is none."""
    if not names:
        return None
    load = {name: 0 for name in names}
    for holder in holders:
        if holder in load:
            load[holder] += 1
    start = next(turn)
    return min(names, key=lambda n: (load[n], (names.index(n) - start) % len(names)))


class Keeper:
    def __init__(self, send: Callable[[str, Message, list], None], log):
        self.send = send
        self.log = log
        self.frontends: dict[str, Frontend] = {}
        self.streams: dict[int, Stream] = {}
        self._ids = itertools.count(1)
        self._turn = itertools.count()
        self.resumed = 0  # streams handed over, in all
        self.received_total = 0  # client messages read, of every stream

    # --- frontends ---------------------------------------------------------------------------

    def hello(self, msg: KeeperHello, now: float) -> dict[int, Close]:
        """A frontend starts, or stops taking new streams. A new pid under a known name is its replacement:
        what the old process held is handed over first. Returns the streams to end (with their error)."""
        ended: dict[int, Close] = {}
        known = self.frontends.get(msg.frontend)
        if known is not None and known.pid != msg.pid:
            ended.update(self.down(msg.frontend, now))
        self.frontends[msg.frontend] = Frontend(msg.frontend, msg.pid, msg.accepting, msg.draining)
        self.assign_waiting()
        return ended

    def down(self, name: str, now: float, pid: int = 0) -> dict[int, Close]:
        """Frontend `name` (process `pid`, 0: whichever) died: its kept streams wait for another, the others
        end with an error. The news of a process whose replacement said hello already is stale."""
        known = self.frontends.get(name)
        if pid and known is not None and known.pid != pid:
            return {}
        self.frontends.pop(name, None)
        ended: dict[int, Close] = {}
        for stream in self.streams.values():
            if stream.frontend != name or stream.done:
                continue
            stream.frontend = None
            if stream.replied:
                ended[stream.id] = Close()
            elif not stream.kept:
                ended[stream.id] = Close(FRONTEND_LOST.format(why=stream.why_not_kept))
            else:
                stream.waiting_since = now
                self.log.info(
                    "stream's frontend died: handing it over",
                    stream=stream.id,
                    peer=stream.peer,
                    frontend=name,
                    messages=stream.received,
                    answered=stream.handled,
                )
        for stream_id in ended:
            self.streams[stream_id].done = True
        self.assign_waiting()
        return ended

    def assign_waiting(self) -> None:
        for stream in self.streams.values():
            if stream.frontend is None and not stream.done:
                self._assign(stream)

    def _choose(self) -> Optional[str]:
        """The accepting frontend with the fewest streams (ties in turn)."""
        accepting = [f.name for f in self.frontends.values() if f.accepting]
        return least_loaded(accepting, (stream.frontend for stream in self.streams.values()), self._turn)

    def _assign(self, stream: Stream) -> None:
        frontend = self._choose()
        if frontend is None:
            return
        resumed = stream.received > 0
        stream.frontend, stream.waiting_since = frontend, None
        markers = [marker for marker, _ in stream.log] if resumed else []
        frames = [payload for _, payload in stream.log] if resumed else []
        self.send(frontend, StreamOpen(stream.id, stream.peer, stream.handled, markers), frames)
        if resumed:
            self.resumed += 1
            self.log.info(
                "stream handed over", stream=stream.id, peer=stream.peer, frontend=frontend, answered=stream.handled
            )

    def refusal(self) -> Optional[str]:
        """Why a new stream cannot be served now: every frontend drains (the node stops)."""
        if self.frontends and all(f.draining for f in self.frontends.values()):
            return SHUTTING_DOWN
        return None

    def overdue(self, now: float, limit: float) -> dict[int, Close]:
        """Streams that waited more than `limit` seconds for a frontend end with an error."""
        ended = {}
        for stream in self.streams.values():
            if stream.frontend is None and not stream.done and stream.waiting_since is not None:
                if now - stream.waiting_since > limit:
                    stream.done = True
                    ended[stream.id] = Close(FRONTEND_LOST.format(why=f"no frontend took it within {limit:.0f} s"))
        return ended

    # --- a stream's client --------------------------------------------------------------------

    def open(self, peer: str, now: float) -> Stream:
        stream = Stream(next(self._ids), peer, waiting_since=now)
        self.streams[stream.id] = stream
        self._assign(stream)
        return stream

    def may_read(self, stream: Stream) -> bool:
        """Backpressure: the client is read no further while its frontend holds WINDOW unhandled messages."""
        return not stream.done and not stream.input_ended and stream.received - stream.handled < WINDOW

    def received(self, stream: Stream, marker: int, payload: bytes, now: float = 0.0) -> Optional[Close]:
        """A client message: logged while the stream is kept, sent to its frontend. A Close when the stream
        must end: it waits for a frontend, and this message took its log past the budget, so that no
        frontend could take it over any more (one would take the message for one it had answered)."""
        stream.received += 1
        self.received_total += 1
        if marker == MESSAGE_MARKER and now:
            stream.arrivals.append((stream.received, now))
        if marker == ERROR_MARKER:
            stream.input_ended = True  # the client's end-of-input (or its error): nothing more is read
        if stream.kept:
            stream.log.append((marker, payload))
            stream.log_bytes += len(payload)
            if stream.budget is not None and stream.log_bytes > stream.budget:
                stream.forget(f"its messages exceeded the {stream.budget} bytes kept for it")
                if stream.frontend is None and not stream.done:
                    stream.done = True
                    return Close(FRONTEND_LOST.format(why=stream.why_not_kept))
        if stream.frontend is not None:
            self.send(stream.frontend, StreamIn(stream.id, marker), [payload])
        return None

    def input_cut(self, stream: Stream) -> None:
        """The client's connection closed with no end-of-input: the client is gone."""
        stream.input_ended = True
        stream.forget("its client is gone")
        if stream.frontend is not None:
            self.send(stream.frontend, StreamInEnd(stream.id), [])
        elif not stream.done:
            stream.done = True

    def gone(self, stream: Stream) -> None:
        """The process is done with the stream's connection."""
        self.streams.pop(stream.id, None)

    # --- a frontend's frames ------------------------------------------------------------------

    def from_frontend(self, sender: str, msg: Message, frames: list) -> tuple[Optional[Stream], Action]:
        """A frontend's message about one of its streams: the stream and what to do on it. Messages from a
        frontend that no longer holds the stream (a late one from a dead process) are ignored."""
        stream = self.streams.get(msg.stream)
        if stream is None or stream.frontend != sender or stream.done:
            return None, None
        if isinstance(msg, StreamOut):
            stream.handled = max(stream.handled, min(msg.handled, stream.received))
            if msg.marker == ERROR_MARKER:
                stream.replied = True
            payload = bytes(frames[0]) if frames else b""
            return stream, Write(msg.marker, payload, msg.compute_us, stream.answering(msg.handled), msg.handled)
        if isinstance(msg, StreamHandled):
            stream.handled = max(stream.handled, min(msg.handled, stream.received))
            stream.answering(msg.handled)  # no reply: its message is not timed
            return stream, None
        if isinstance(msg, StreamKeep):
            if msg.budget <= 0:
                stream.forget("its frontend does not keep its history")
            else:
                stream.budget = msg.budget
                if stream.log_bytes > msg.budget:
                    stream.forget(f"its messages exceeded the {msg.budget} bytes kept for it")
            return stream, None
        if isinstance(msg, StreamDone):
            stream.done = True
            return stream, Close()
        return None, None

    # --- what the keeper holds ------------------------------------------------------------------

    def counts(self) -> tuple[int, int, int]:
        """(streams, kept streams, bytes logged)."""
        live = [s for s in self.streams.values() if not s.done]
        return len(live), sum(s.kept for s in live), sum(s.log_bytes for s in live)
