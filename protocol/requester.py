"""Request/reply over one asyncio DEALER: each request carries an id, each reply resolves its future.

A peer that dies takes its pending requests with it: `down` turns them into errors at once (the
supervisor says when a peer was replaced) and a timeout bounds every wait. `request_surviving` sends a
request again to the replacement once it is `up`, so that the peer's replacement costs the caller only
time; a caller that must do more first (rebuild state the peer lost) uses `wait_up` itself.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any, Callable, Optional, Sequence

import zmq
import zmq.asyncio

from protocol.messages import Message
from protocol.transport import AsyncChannel, BadMessage, Envelope, Observer


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


class PeerUnavailable(RuntimeError):
    pass


class Requester:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        identity: str,
        accepts: Any,
        *,
        observer: Optional[Observer] = None,
        on_unsolicited: Optional[Callable[[Envelope], None]] = None,
        log=None,
    ):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, identity.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        self.channel = AsyncChannel(sock, accepts, observer=observer)
        # a random start: a replaced actor reuses its name (ROUTER_HANDOVER), so a late reply to its
        # predecessor's request must not match one of its own
        self._ids = itertools.count(random.randrange(1, 1 << 31))
        self._pending: dict[int, asyncio.Future] = {}
        self._on_unsolicited = on_unsolicited
        self._log = log
        self._reader: Optional[asyncio.Task] = None
        self._up = asyncio.Event()  # cleared while the peer is being replaced
        self._up.set()

    @classmethod
    def to_actor(
        cls, actor, ctx: zmq.asyncio.Context, target: str, accepts: Any, *, observed: bool = False, on_unsolicited=None
    ) -> "Requester":
        """`actor`'s requester to the actor that listens on RUN_DIR/<target>.sock: identified by the asking
        actor's name, taking replies of type `accepts`, seen by its probe when `observed`."""
        return cls(
            ctx,
            actor.plan.endpoint(f"{target}.sock"),
            actor.name,
            accepts,
            observer=actor.probe.observe if observed else None,
            on_unsolicited=on_unsolicited,
            log=actor.log,
        )

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def next_id(self) -> int:
        return next(self._ids)

    def send(self, msg: Message, frames: Sequence = ()) -> None:
        """Fire and forget (Release, Cancel, Adopt...)."""
        self.channel.send(msg, frames)

    async def request(self, msg: Message, frames: Sequence = (), timeout: Optional[float] = None) -> Envelope:
        """Send `msg` (whose `req` came from next_id) and wait for the reply with the same `req`."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[msg.req] = future
        # a timer on the future itself: asyncio.wait_for adds a second future and callbacks to every
        # request, a cost paid on each inference step
        timer = None if timeout is None else loop.call_later(timeout, _expire, future)
        try:
            self.channel.send(msg, frames)
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.pop(msg.req, None)

    def down(self, reason: str) -> None:
        """The peer died: what waits on it fails now, and callers that survive it wait for `up`."""
        self._up.clear()
        self.fail_all(reason)

    def up(self) -> None:
        self._up.set()

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    async def wait_up(self, timeout: float) -> bool:
        """Whether the peer is up, waiting for its replacement up to `timeout` seconds."""
        try:
            await asyncio.wait_for(self._up.wait(), max(0.0, timeout))
            return True
        except asyncio.TimeoutError:
            return False

    async def request_surviving(self, make: Callable[[], Message], frames: Sequence = (), timeout: float = 60.0):
        """Like request, but a peer that dies meanwhile is waited for and the request (made anew by `make`)
        sent to its replacement, until `timeout` seconds have passed; PeerUnavailable after that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not await self.wait_up(deadline - loop.time()):
                raise PeerUnavailable("it was not back in time")
            try:
                return await self.request(make(), frames, max(0.001, deadline - loop.time()))
            except PeerUnavailable:
                if loop.time() >= deadline or self._up.is_set():
                    raise  # failed with the peer still up (fail_all: our own process stops): no replacement to wait for

    def fail_all(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PeerUnavailable(reason))

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def _read(self) -> None:
        while True:
            try:
                envelope = await self.channel.recv()
            except BadMessage as e:
                if self._log is not None:
                    self._log.warning("bad reply", reason=e.reason)
                continue
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            req = getattr(envelope.msg, "req", None)
            future = self._pending.get(req) if req is not None else None
            if future is not None and not future.done():
                future.set_result(envelope)
            elif self._on_unsolicited is not None:  # a reply to a request that stopped waiting is one too
                self._on_unsolicited(envelope)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.fail_all("shutting down")
        self.channel.close(0)
