"""Typed ZeroMQ channels: a header frame with one msgspec message, then raw tensor frames.

A channel wraps one socket with the one decoder that socket accepts. A ROUTER channel's messages
carry the peer identity; a DEALER channel's do not. An undecodable message raises BadMessage so the
owner can answer with an error instead of dying.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import msgspec
import zmq
import zmq.asyncio

from protocol.messages import Message

Observer = Callable[[str, Message, Optional[bytes]], None]  # (direction "in"/"out", message, peer identity)

_encoder = msgspec.msgpack.Encoder()


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
    """A zmq.asyncio socket used from one event loop."""

    def __init__(
        self, sock: zmq.asyncio.Socket, accepts: Any, *, router: bool = False, observer: Optional[Observer] = None
    ):
        super().__init__(accepts, router, observer)
        self.sock = sock

    def send(self, msg: Message, frames: Sequence = (), to: Optional[bytes] = None) -> None:
        """Queue the message without waiting: ZeroMQ buffers it (high-water mark permitting).

        pyzmq tries the send at once; a failure (an unroutable identity on a ROUTER) is raised here,
        not left in a future that nobody reads.
        """
        future = self.sock.send_multipart(self._pack(msg, frames, to), copy=False)
        if future.done():
            future.result()

    async def recv(self) -> Envelope:
        return self._unpack(await self.sock.recv_multipart(copy=False))
