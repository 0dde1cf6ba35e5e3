"""The floor under a call as a client sees it: its bytes out and its reply's back between two fresh p2pd
daemons on loopback, with a handler that computes nothing.

A Petals client's step is one message out and its reply back on an open hivemind stream, plus the server's
work, so `node.bench` compares the node's step against this echo plus the runtime's compute (issue 22
item 6, `echo_round_trips`). A forward or backward of 4 x 128 tokens moves megabytes each way (serialized,
split into parts, through both daemons and back, then assembled), a cost that transformers' own layers in
the client's process never pay: `transfer_round_trips` measures it for the bench's forward and backward
rows. Both daemons are started by hivemind (P2P.create) and shut down before either returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

HANDLER = "bare.echo"
TRANSFER_HANDLER = "bare.transfer"
PART_BYTES = 2 << 20  # the parts a stream's tensors are split into (hivemind's client: DEFAULT_MAX_MSG_SIZE / 2)


@contextlib.asynccontextmanager
async def _two_daemons(name: str, handler):
    """(server, client): two fresh p2pd daemons on loopback, the server's stream `handler` registered as
    `name`; both shut down on leaving."""
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = None
    try:
        await server.add_protobuf_handler(
            name, handler, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
        yield server, client
    finally:
        if client is not None:
            await client.shutdown()
        await server.shutdown()


async def _echo(requests, context):
    async for request in requests:
        yield runtime_pb2.ExpertResponse(tensors=request.tensors)


async def _round_trips(hidden_size: int, steps: int, warmup: int, timeout: float) -> list[float]:
    async with _two_daemons(HANDLER, _echo) as (server, client):
        # the same payload as a decode step: one token's hidden state and a small metadata blob
        tensor = serialize_torch_tensor(torch.randn(1, 1, hidden_size))
        request = runtime_pb2.ExpertRequest(uid="bare", tensors=[tensor], metadata=b"\x00" * 128)
        queue: asyncio.Queue = asyncio.Queue()

        async def outgoing():
            while (item := await queue.get()) is not None:
                yield item

        replies = await client.iterate_protobuf_handler(server.peer_id, HANDLER, outgoing(), runtime_pb2.ExpertResponse)
        times = []
        for i in range(warmup + steps):
            began = time.perf_counter()
            queue.put_nowait(request)
            await asyncio.wait_for(replies.__anext__(), timeout)
            if i >= warmup:
                times.append(time.perf_counter() - began)
        queue.put_nowait(None)
        return times


def echo_round_trips(hidden_size: int, steps: int = 100, warmup: int = 10, timeout: float = 10.0) -> list[float]:
    """Seconds per round trip of a decode-step-sized message, `steps` of them after `warmup`."""
    return asyncio.run(_round_trips(hidden_size, steps, warmup, timeout))


async def _transfers(sent: list[torch.Tensor], returned: torch.Tensor, calls: int, warmup: int, timeout: float):
    async def handler(requests, context):
        async for _ in requests:  # the whole request first, as a server needs it
            pass
        for part in split_for_streaming(serialize_torch_tensor(returned), PART_BYTES):
            yield runtime_pb2.ExpertResponse(tensors=[part])

    async with _two_daemons(TRANSFER_HANDLER, handler) as (server, client):

        async def one() -> None:
            async def parts():
                for tensor in sent:
                    for part in split_for_streaming(serialize_torch_tensor(tensor), PART_BYTES):
                        yield runtime_pb2.ExpertRequest(uid="bare", tensors=[part])

            replies = await client.iterate_protobuf_handler(
                server.peer_id, TRANSFER_HANDLER, parts(), runtime_pb2.ExpertResponse
            )
            deserialize_torch_tensor(combine_from_streaming([r.tensors[0] async for r in replies]))

        times = []
        for i in range(warmup + calls):
            began = time.perf_counter()
            await asyncio.wait_for(one(), timeout)
            if i >= warmup:
                times.append(time.perf_counter() - began)
        return times


def transfer_round_trips(
    sent: list[torch.Tensor], returned: torch.Tensor, calls: int = 5, warmup: int = 1, timeout: float = 60.0
) -> list[float]:
    """Seconds per call that sends `sent` and gets a tensor like `returned` back, as a Petals client's forward
    or backward stream does (serialized, in parts, assembled and deserialized at the other end), to a
    server that computes nothing: `calls` of them after `warmup`."""
    return asyncio.run(_transfers(sent, returned, calls, warmup, timeout))
