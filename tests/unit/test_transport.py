"""protocol/transport.py's AsyncChannel on real ZeroMQ sockets (inproc and ipc) in one event loop: what
one end sends the other receives, whole and in order, however the messages come (in bursts beyond the
channel's read-ahead, behind a full high-water mark, to a receiver cancelled while waiting)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import zmq
import zmq.asyncio

from protocol.messages import Heartbeat
from protocol.transport import AsyncChannel, BadMessage


@contextlib.contextmanager
def pair(endpoint: str, hwm: int = 1000):
    """(ROUTER channel, DEALER channel) connected at `endpoint`, closed with their context afterwards."""
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.RCVHWM, hwm)
    router.bind(endpoint)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"d")
    dealer.setsockopt(zmq.SNDHWM, hwm)
    dealer.connect(endpoint)
    channels = AsyncChannel(router, Heartbeat, router=True), AsyncChannel(dealer, Heartbeat)
    try:
        yield channels
    finally:
        for channel in channels:
            channel.close(0)  # a second close (a test closed it itself) does nothing
        ctx.term()


def run(coro, seconds: float = 20.0):
    async def bounded():
        return await asyncio.wait_for(coro, seconds)

    return asyncio.run(bounded())


@pytest.mark.parametrize("endpoint", ["inproc://transport-test", "ipc"])
def test_every_message_arrives_in_order_with_its_frames(tmp_path, endpoint):
    endpoint = f"ipc://{tmp_path}/t.sock" if endpoint == "ipc" else endpoint

    async def main():
        with pair(endpoint) as (router, dealer):
            count = 5 * AsyncChannel.INBOX  # beyond the read-ahead: the rest is read as room is made
            for i in range(count):
                dealer.send(Heartbeat(f"n{i}", pid=i), [bytes([i % 256]) * 3])
            got = []
            for _ in range(count):
                envelope = await router.recv()
                assert envelope.sender == b"d"
                got.append((envelope.msg.pid, bytes(envelope.frames[0])))
            assert got == [(i, bytes([i % 256]) * 3) for i in range(count)]
            router.send(Heartbeat("back", pid=7), to=b"d")
            assert (await dealer.recv()).msg.pid == 7

    run(main())


def test_sends_behind_a_full_high_water_mark_wait_their_turn_and_arrive(tmp_path):
    """The receiver reads nothing while 2000 messages are sent over a high-water mark of 10: the sends
    that would block wait in order in the outbox and go when the receiver reads."""

    async def main():
        with pair(f"ipc://{tmp_path}/hwm.sock", hwm=10) as (router, dealer):
            for i in range(2000):
                dealer.send(Heartbeat("x", pid=i), [b"\0" * 1024])
            assert dealer._outbox  # some did wait
            pids = [(await router.recv()).msg.pid for _ in range(2000)]
            assert pids == list(range(2000))
            assert not dealer._outbox

    run(main())


def test_a_receiver_cancelled_while_waiting_loses_nothing():
    async def main():
        with pair("inproc://cancelled") as (router, dealer):
            waiting = asyncio.ensure_future(router.recv())
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            dealer.send(Heartbeat("after", pid=1))
            assert (await asyncio.wait_for(router.recv(), 5)).msg.pid == 1

    run(main())


def test_an_undecodable_message_is_a_bad_message_and_the_next_one_is_read():
    async def main():
        with pair("inproc://bad") as (router, dealer):
            raw = zmq.Socket.shadow(dealer.sock.underlying)
            raw.send_multipart([b"\xc1 not msgpack"])
            dealer.send(Heartbeat("good", pid=2))
            with pytest.raises(BadMessage) as refused:
                await router.recv()
            assert refused.value.sender == b"d"
            assert (await router.recv()).msg.pid == 2

    run(main())


def test_an_unroutable_identity_is_refused_at_send():
    async def main():
        with pair("inproc://unroutable") as (router, dealer):
            with pytest.raises(zmq.ZMQError):
                router.send(Heartbeat("nobody"), to=b"nobody")

    run(main())


def test_a_receiver_waiting_when_the_channel_closes_is_cancelled():
    async def main():
        with pair("inproc://closing") as (router, dealer):
            waiting = asyncio.ensure_future(router.recv())
            await asyncio.sleep(0.05)
            router.close(0)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(waiting, 5)
            with pytest.raises(zmq.ZMQError):
                await router.recv()

    run(main())
