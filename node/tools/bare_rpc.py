"""The floor under an inference step as a client sees it: one message out and its reply back on an open
hivemind stream between two fresh p2pd daemons on loopback, with a handler that only echoes.

A Petals client's step is exactly that trip plus the server's work, so `node.bench` compares the node's
step against this echo plus the runtime's compute (issue 22 item 6). Both daemons are started by hivemind
(P2P.create) and shut down before `echo_round_trips` returns.
"""

from __future__ import annotations

import asyncio
import time

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

HANDLER = "bare.echo"


async def _echo(requests, context):
    async for request in requests:
        yield runtime_pb2.ExpertResponse(tensors=request.tensors)


async def _round_trips(hidden_size: int, steps: int, warmup: int, timeout: float) -> list[float]:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = None
    try:
        await server.add_protobuf_handler(
            HANDLER, _echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
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
    finally:
        if client is not None:
            await client.shutdown()
        await server.shutdown()


def echo_round_trips(hidden_size: int, steps: int = 100, warmup: int = 10, timeout: float = 10.0) -> list[float]:
    """Seconds per round trip of a decode-step-sized message, `steps` of them after `warmup`."""
    return asyncio.run(_round_trips(hidden_size, steps, warmup, timeout))
