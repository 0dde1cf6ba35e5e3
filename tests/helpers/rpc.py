"""Petals requests built by hand, valid or broken on purpose, and a caller that sends them to a node
and reports what came back: for bad-input tests and the fuzzer."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Optional, Sequence

import torch
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2

from node.client.swarm import ARGS_2, ARGS_3, PREFIX, _aiter, _stream_parts
from protocol import stream_framing as framing
from protocol import wire

H = 64  # micro-llama's hidden size


UID = "micro-llama.0 micro-llama.1 micro-llama.2 micro-llama.3"


MAX_TOKENS = 8192  # micro_node's max_batch_size and inference_max_length (GQA defaults)


TIMEOUT = 20.0


UNARY = ("rpc_info", "rpc_forward", "rpc_backward", "rpc_push")


STREAMS = ("rpc_forward_stream", "rpc_backward_stream", "rpc_inference")


TENSOR_RPCS = ("rpc_forward", "rpc_backward", "rpc_forward_stream", "rpc_backward_stream", "rpc_inference")


CHAIN_RPCS = ("rpc_info",) + TENSOR_RPCS + ("rpc_push",)


BACKWARD = ("rpc_backward", "rpc_backward_stream")


INFERENCE = ("rpc_inference",)


def enc(t) -> runtime_pb2.Tensor:
    """A torch tensor -> its wire form; a runtime_pb2.Tensor (hand-made, maybe malformed) passes as is."""
    if isinstance(t, runtime_pb2.Tensor):
        return t
    return wire.encode_tensor(wire.from_torch(t.contiguous()))


def hidden(b: int = 1, t: int = 3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(b, t, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


EMPTY = torch.empty(0)


NO_HYPO = torch.empty(0, dtype=torch.int64)


def kind(rpc: str) -> str:
    return "backward" if rpc.startswith("rpc_backward") else rpc.removeprefix("rpc_").removesuffix("_stream")


def default_tensors(rpc: str, h: Optional[torch.Tensor] = None) -> list:
    h = hidden() if h is None else h
    return {
        "forward": [h, EMPTY],
        "backward": [h, torch.ones_like(h), EMPTY],
        "inference": [h, EMPTY, NO_HYPO],
        "push": [h, EMPTY, NO_HYPO],
    }[kind(rpc)]


def default_metadata(rpc: str) -> dict:
    if kind(rpc) == "forward":
        return {"points": 0.0, "active_adapter": None, "args_structure": ARGS_2}
    if kind(rpc) == "backward":
        return {"points": 0.0, "active_adapter": None, "args_structure": ARGS_3}
    return {  # the first step of an inference session, as a Petals client sends it
        "session_id": str(uuid.uuid4()),
        "step_id": str(uuid.uuid4()),
        "max_length": 8,
        "points": 0.0,
        "active_adapter": None,
        "args_structure": ARGS_3,
        "start_from_position": 0,
    }


_DEFAULT = object()


def request(
    rpc: str, tensors: Any = _DEFAULT, uid: str = UID, drop: Sequence[str] = (), **metadata
) -> runtime_pb2.ExpertRequest:
    """A valid request for `rpc` with `tensors`/`metadata` overridden (`drop` removes metadata keys)."""
    tensors = default_tensors(rpc) if tensors is _DEFAULT else tensors
    meta = dict(default_metadata(rpc), **metadata)
    for key in drop:
        meta.pop(key, None)
    return runtime_pb2.ExpertRequest(uid=uid, tensors=[enc(t) for t in tensors], metadata=wire.pack_metadata(meta))


def next_step(first: runtime_pb2.ExpertRequest, tensors: Sequence, **metadata) -> runtime_pb2.ExpertRequest:
    """A later step of the session that `first` opened (session_id and args_structure kept, no max_length)."""
    meta = wire.unpack_metadata(first.metadata)
    meta = {"session_id": meta["session_id"], "step_id": str(uuid.uuid4()), "args_structure": ARGS_3, **metadata}
    return runtime_pb2.ExpertRequest(
        uid=first.uid, tensors=[enc(t) for t in tensors], metadata=wire.pack_metadata(meta)
    )


class Caller:
    def __init__(self, client, node):
        self.client = client
        self.swarm = client.swarm
        self.peer = node.peer_id

    def run(self, coroutine, timeout: float = TIMEOUT + 10):
        return self.client.run(coroutine, timeout=timeout)

    async def acall(self, rpc: str, messages) -> list[runtime_pb2.ExpertResponse]:
        """Send one request (or, for rpc_inference, a list of steps); returns the responses or raises."""
        if rpc in UNARY:
            response_type = runtime_pb2.ExpertInfo if rpc == "rpc_info" else runtime_pb2.ExpertResponse
            return [await self.swarm.call_unary(self.peer, rpc, messages, response_type, timeout=TIMEOUT)]
        if rpc == "rpc_inference":
            parts = messages if isinstance(messages, list) else [messages]
        else:
            # a hand-made tensor without a dtype cannot be split like a client splits; it goes as one part
            parts = (
                _stream_parts(messages) if messages.tensors and all(t.dtype for t in messages.tensors) else [messages]
            )
        return await self.swarm.call_stream(self.peer, rpc, parts, timeout=TIMEOUT)

    async def acall_collect(self, rpc: str, messages) -> tuple[list, Optional[Exception]]:
        """Like acall, but returns (responses received before the error, the error)."""
        if rpc != "rpc_inference":
            try:
                return await self.acall(rpc, messages), None
            except P2PHandlerError as e:
                return [], e
        responses, messages = [], messages if isinstance(messages, list) else [messages]

        async def collect():
            stream = await self.swarm.p2p.iterate_protobuf_handler(
                PeerID.from_base58(self.peer), PREFIX + rpc, _aiter(messages), runtime_pb2.ExpertResponse
            )
            async for response in stream:
                responses.append(response)

        try:
            await asyncio.wait_for(collect(), TIMEOUT)
        except P2PHandlerError as e:
            return responses, e
        return responses, None

    def call(self, rpc: str, messages):
        return self.run(self.acall(rpc, messages))

    def expect_error(self, rpc: str, messages, *needles: str, responses_before: int = 0) -> str:
        """The call must fail with an error whose text contains every needle; returns that text."""
        responses, error = self.run(self.acall_collect(rpc, messages))
        assert error is not None, f"{rpc} accepted bad input and answered {len(responses)} message(s)"
        text = str(error)
        for needle in needles:
            assert needle in text, f"{rpc}: error {text!r} does not mention {needle!r}"
        assert len(responses) == responses_before, f"{rpc}: {len(responses)} replies before the error {text!r}"
        if rpc in STREAMS:
            assert f"Failed to call handler `{PREFIX}{rpc}`" in text
        return text

    async def araw_unary(self, rpc: str, data: bytes) -> bytes:
        """Bytes that need not be a protobuf, straight through the daemon (hivemind's P2P sends protobufs only)."""
        p2p = self.swarm.p2p
        return await asyncio.wait_for(
            p2p._client.call_unary_handler(PeerID.from_base58(self.peer), PREFIX + rpc, data), TIMEOUT
        )

    async def araw_stream(self, rpc: str, data: bytes) -> list[tuple[bytes, bytes]]:
        """Write raw bytes into a stream RPC; returns every frame the server sends until it closes (or, after an
        error frame, until 0.2 s pass without another)."""
        _, reader, writer = await self.swarm.p2p.call_binary_stream_handler(PeerID.from_base58(self.peer), PREFIX + rpc)
        frames = []
        try:
            try:
                writer.write(data)
                await writer.drain()
            except ConnectionError:
                pass  # the server may refuse and close before our write is flushed: its reply is still there
            while True:
                # after an error, a moment for anything that would wrongly follow it; then we close, as
                # hivemind's client does (the server waits for that: node/frontend/streams.py drain_input)
                after_error = frames and frames[-1][0] == framing.ERROR
                try:
                    frames.append(await asyncio.wait_for(framing.read_frame(reader), 0.2 if after_error else TIMEOUT))
                except asyncio.IncompleteReadError:
                    return frames
                except asyncio.TimeoutError:
                    if after_error:
                        return frames
                    raise
        finally:
            writer.close()
