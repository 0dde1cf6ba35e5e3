"""Typed ZeroMQ channels: a header frame with one msgspec message, then raw tensor frames.

A channel wraps one socket with the one decoder that socket accepts. A ROUTER channel's messages
carry the peer identity; a DEALER channel's do not. An undecodable message raises BadMessage so the
owner can answer with an error instead of dying.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Callable, NamedTuple, Optional, Sequence

import msgspec
import zmq

from protocol.messages import Message

Observer = Callable[[str, Message, Optional[bytes]], None]  # (direction "in"/"out", message, peer identity)

_encoder = msgspec.msgpack.Encoder()
# plain ints: pyzmq's flags are enums, and an enum's `&` costs more than the call that gave the events
_EVENTS, _POLLIN, _POLLOUT, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)


class Envelope(NamedTuple):
    sender: Optional[bytes]  # the peer identity on a ROUTER; None on a DEALER
    msg: Message
    frames: list  # raw tensor frames (zmq.Frame or bytes), in the order of msg.tensors


class BadMessage(Exception):
    def __init__(self, sender: Optional[bytes], reason: str):
        super().__init__(reason)
        self.sender = sender
        self.reason = reason


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


class _Codec:
    def __init__(self, accepts: Any, router: bool, observer: Optional[Observer]):
        self._decoder = msgspec.msgpack.Decoder(accepts)
        self._router = router
        self.observer = observer

    def _pack(self, msg: Message, frames: Sequence, to: Optional[bytes]) -> list:
        if self._router and to is None:
            raise ValueError("a ROUTER channel needs a destination identity")
        parts = [to] if self._router else []
        parts.append(_encoder.encode(msg))
        parts.extend(frames)
        if self.observer is not None:
            self.observer("out", msg, to)
        return parts

    def _unpack(self, parts: list) -> Envelope:
        sender = None
        if self._router:
            sender = bytes(parts[0])
            parts = parts[1:]
        if not parts:
            raise BadMessage(sender, "empty message")
        header = parts[0]
        try:
            msg = self._decoder.decode(header.buffer if isinstance(header, zmq.Frame) else header)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadMessage(sender, f"undecodable message: {e}") from None
        if self.observer is not None:
            self.observer("in", msg, sender)
        return Envelope(sender, msg, parts[1:])


class Channel(_Codec):
    """A blocking socket used by exactly one thread."""

    def __init__(self, sock: zmq.Socket, accepts: Any, *, router: bool = False, observer: Optional[Observer] = None):
        super().__init__(accepts, router, observer)
        self.sock = sock

    def send(self, msg: Message, frames: Sequence = (), to: Optional[bytes] = None) -> None:
        self.sock.send_multipart(self._pack(msg, frames, to), copy=False)

    def recv(self) -> Envelope:
        return self._unpack(self.sock.recv_multipart(copy=False))

    def recv_nowait(self) -> Optional[Envelope]:
        try:
            parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return self._unpack(parts)


class AsyncChannel(_Codec):
    """A socket used from one event loop. The loop watches the socket's descriptor and, when it signals,
    reads what has arrived into a queue, up to INBOX messages: zmq.asyncio's futures cost a quarter of the
    frontend's time per inference step on the micro model. Sends go at once; one that would block (the
    high-water mark) waits in order in an outbox, retried when the socket signals."""

    INBOX = 64  # messages read ahead of the owner; beyond them ZeroMQ's own queue holds the rest
    RETRY_SECONDS = 0.01  # a blocked send is also retried this often (the descriptor may stay quiet)

    def __init__(self, sock: zmq.Socket, accepts: Any, *, router: bool = False, observer: Optional[Observer] = None):
        super().__init__(accepts, router, observer)
        self.sock = sock  # whoever made it may still poll or close it
        # plain calls on the same ZeroMQ socket: no futures, whatever the class of `sock`
        self._io = zmq.Socket.shadow(sock.underlying)
        self._inbox: deque = deque()
        self._outbox: deque = deque()
        self._waiters: deque = deque()  # futures of recv calls waiting for a message
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._fd = -1
        self._retry: Optional[asyncio.TimerHandle] = None

    def _watch(self) -> bool:
        """Whether the running loop watches the socket (no loop runs: nobody can wait for it either)."""
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return False
            self._fd = self._io.getsockopt(zmq.FD)
            self._loop.add_reader(self._fd, self._ready)
        return self._fd != -1

    def _ready(self) -> None:
        """The descriptor signalled (edge-triggered: whatever is there now must be taken now, or it
        signals no more), or the owner made room."""
        io = self._io
        try:
            while True:
                events = io.getsockopt(_EVENTS)
                if self._outbox and events & _POLLOUT:
                    try:
                        io.send_multipart(self._outbox[0], _NOBLOCK, copy=False)
                        self._outbox.popleft()
                        continue
                    except zmq.Again:
                        pass
                    except zmq.ZMQError as e:
                        if e.errno != zmq.EHOSTUNREACH:
                            raise
                        self._outbox.popleft()  # its peer left while it waited: as ZeroMQ drops it
                        continue
                if events & _POLLIN and len(self._inbox) < self.INBOX:
                    self._inbox.append(io.recv_multipart(_NOBLOCK, copy=False))
                    continue
                break
        except zmq.ZMQError:
            return  # closed under us: nothing more will come
        while self._inbox and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if self._outbox and self._retry is None and self._loop is not None:
            self._retry = self._loop.call_later(self.RETRY_SECONDS, self._retried)

    def _retried(self) -> None:
        self._retry = None
        self._ready()

    def send(self, msg: Message, frames: Sequence = (), to: Optional[bytes] = None) -> None:
        """Send without waiting; a failure (an unroutable identity on a ROUTER) is raised here."""
        parts = self._pack(msg, frames, to)
        if self._outbox:
            self._outbox.append(parts)  # behind what waits already: order kept
        else:
            try:
                self._io.send_multipart(parts, _NOBLOCK, copy=False)
            except zmq.Again:
                self._outbox.append(parts)
        if self._watch():
            # any call on the socket may take the descriptor's signal for a message that came meanwhile
            self._ready()

    async def recv(self) -> Envelope:
        if not self._watch():
            raise zmq.ZMQError(zmq.ENOTSOCK, "the channel is closed")
        while not self._inbox:
            self._ready()
            if self._inbox:
                break
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
        parts = self._inbox.popleft()
        if len(self._inbox) == self.INBOX - 1:
            self._loop.call_soon(self._ready)  # it was full: read on
        return self._unpack(parts)

    def close(self, linger: Optional[int] = None) -> None:
        if self._loop is not None and self._fd != -1 and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        if self._retry is not None:
            self._retry.cancel()
        for waiter in self._waiters:  # as zmq.asyncio did: whoever still waits is cancelled, not left hanging
            waiter.cancel()
        self._fd = -1
        self.sock.close(linger)
