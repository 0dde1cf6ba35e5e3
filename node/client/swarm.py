"""A small client that speaks the Petals protocol like a Petals client does.

It finds servers in the DHT (block records, spans of ONLINE servers), and runs forward, backward
and inference sessions through one server or a chain of them. Tests, the benchmark and the demo
use it; it is not a replacement for the Petals client (no retries, no fancy routing).

`SwarmClient` is asyncio; `Client` wraps it for synchronous code with a private event loop thread.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Sequence

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from node import msgpack_depth
from protocol import wire
from protocol.dht_records import ServerInfo, ServerState, block_uids, read_servers

PREFIX = "TransformerConnectionHandler."
ARGS_2 = ((b"__T0", b"__T1"), {})
ARGS_3 = ((b"__T0", b"__T1", b"__T2"), {})
MAX_UNARY_BYTES = 1024 * 1024  # above this a Petals client switches to the *_stream RPCs
STREAM_PART_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RemoteSpan:
    peer_id: str
    start: int
    end: int
    info: ServerInfo


def _encode(t: torch.Tensor) -> runtime_pb2.Tensor:
    return wire.encode_tensor(wire.from_torch(t.detach().cpu().contiguous()))


def _decode(proto: runtime_pb2.Tensor) -> torch.Tensor:
    return wire.to_torch(wire.decode_tensor(proto)).clone()


def _empty(dtype=torch.float32) -> torch.Tensor:
    return torch.empty(0, dtype=dtype)


def _request(uid: str, tensors: Sequence[torch.Tensor], metadata: dict) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(
        uid=uid, tensors=[_encode(t) for t in tensors], metadata=wire.pack_metadata(metadata)
    )


def _stream_parts(request: runtime_pb2.ExpertRequest) -> list[runtime_pb2.ExpertRequest]:
    parts = []
    for tensor in request.tensors:
        for part in wire.split_for_stream(tensor, STREAM_PART_BYTES):
            parts.append(runtime_pb2.ExpertRequest(uid=request.uid, tensors=[part], metadata=request.metadata))
    return parts


async def _aiter(items):
    for item in items:
        yield item


class SwarmClient:
    def __init__(self, dht: DHTNode, dht_prefix: str):
        self.dht = dht
        self.p2p: P2P = dht.p2p
        self.prefix = dht_prefix
        self.active_adapter: Optional[str] = None  # a LoRA adapter the servers must apply (and publish)

    @classmethod
    async def connect(cls, initial_peers: Sequence[str], dht_prefix: str) -> "SwarmClient":
        msgpack_depth.install()  # what any peer stored is decoded here too
        dht = await DHTNode.create(
            initial_peers=list(initial_peers),
            client_mode=True,
            num_workers=32,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        )
        return cls(dht, dht_prefix)

    async def close(self) -> None:
        await self.dht.shutdown()

    # --- the swarm ---------------------------------------------------------------------------

    async def servers(self, num_blocks: int) -> dict[int, dict[str, ServerInfo]]:
        """Every valid server record per block, as a Petals client reads them (latest=True)."""
        return await read_servers(self.dht, self.prefix, num_blocks)

    async def spans(self, num_blocks: int, min_state: ServerState = ServerState.ONLINE) -> list[RemoteSpan]:
        spans: dict[str, RemoteSpan] = {}
        for index, infos in (await self.servers(num_blocks)).items():
            for peer, info in sorted(infos.items()):
                if info.state < min_state:
                    continue
                start = info.start_block if info.start_block is not None else index
                end = info.end_block if info.end_block is not None else index + 1
                spans.setdefault(peer, RemoteSpan(peer, start, end, info))
        return sorted(spans.values(), key=lambda s: (s.start, s.peer_id))

    async def route(self, start: int, end: int, num_blocks: Optional[int] = None) -> list[RemoteSpan]:
        """Cover [start, end) greedily with the span that reaches furthest at each point."""
        spans = await self.spans(num_blocks or end)
        if self.active_adapter:  # as Petals clients do: only servers that publish the adapter (PROTOCOL 5.12)
            spans = [s for s in spans if self.active_adapter in (s.info.adapters or ())]
        route, position = [], start
        while position < end:
            covering = [s for s in spans if s.start <= position < s.end]
            if not covering:
                with_adapter = f" with adapter {self.active_adapter}" if self.active_adapter else ""
                raise RuntimeError(f"no ONLINE server{with_adapter} holds block {position} of {self.prefix}")
            best = max(covering, key=lambda s: s.end)
            route.append(RemoteSpan(best.peer_id, position, min(best.end, end), best.info))
            position = min(best.end, end)
        return route

    def uid(self, start: int, end: int) -> str:
        return " ".join(block_uids(self.prefix, start, end))

    # --- calls -------------------------------------------------------------------------------

    async def call_unary(self, peer: str, rpc: str, request, response_type=runtime_pb2.ExpertResponse, timeout=60.0):
        return await asyncio.wait_for(
            self.p2p.call_protobuf_handler(PeerID.from_base58(peer), PREFIX + rpc, request, response_type), timeout
        )

    async def call_stream(self, peer: str, rpc: str, parts: list, timeout=60.0) -> list:
        async def collect():
            stream = await self.p2p.iterate_protobuf_handler(
                PeerID.from_base58(peer), PREFIX + rpc, _aiter(parts), runtime_pb2.ExpertResponse
            )
            return [response async for response in stream]

        return await asyncio.wait_for(collect(), timeout)

    async def rpc_info(self, peer: str, uid: str = "") -> dict:
        response = await self.call_unary(peer, "rpc_info", runtime_pb2.ExpertUID(uid=uid), runtime_pb2.ExpertInfo)
        return wire.unpack_metadata(response.serialized_info)

    async def _call_tensors(
        self, peer: str, rpc: str, request: runtime_pb2.ExpertRequest, raw_bytes: int
    ) -> list[torch.Tensor]:
        if raw_bytes > MAX_UNARY_BYTES:
            responses = await self.call_stream(peer, rpc + "_stream", _stream_parts(request))
            assembler = wire.StreamAssembler()
            tensors = []
            for response in responses:
                tensors.extend(assembler.feed(response.tensors))
            assembler.finish()
            return [_decode(t) for t in tensors]
        response = await self.call_unary(peer, rpc, request)
        return [_decode(t) for t in response.tensors]

    async def forward_span(
        self, span: RemoteSpan, hidden: torch.Tensor, prompts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        metadata = {"points": 0.0, "active_adapter": self.active_adapter, "args_structure": ARGS_2}
        tensors = [hidden, prompts if prompts is not None else _empty()]
        request = _request(self.uid(span.start, span.end), tensors, metadata)
        (output,) = await self._call_tensors(
            span.peer_id, "rpc_forward", request, sum(t.numel() * t.element_size() for t in tensors)
        )
        return output

    async def backward_span(
        self, span: RemoteSpan, inputs: torch.Tensor, grad_outputs: torch.Tensor, prompts: Optional[torch.Tensor] = None
    ) -> list[torch.Tensor]:
        metadata = {"points": 0.0, "active_adapter": self.active_adapter, "args_structure": ARGS_3}
        tensors = [inputs, grad_outputs, prompts if prompts is not None else _empty()]
        request = _request(self.uid(span.start, span.end), tensors, metadata)
        return await self._call_tensors(
            span.peer_id, "rpc_backward", request, sum(t.numel() * t.element_size() for t in tensors)
        )

    async def forward(
        self, hidden: torch.Tensor, start: int, end: int, prompts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        for span in await self.route(start, end):
            span_prompts = prompts[span.start - start : span.end - start] if prompts is not None else None
            hidden = (await self.forward_span(span, hidden, span_prompts)).to(hidden.dtype)
        return hidden

    async def backward(
        self,
        inputs: torch.Tensor,
        grad_outputs: torch.Tensor,
        start: int,
        end: int,
        prompts: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Re-runs the forward span by span to get each span's input, then backprops in reverse."""
        route = await self.route(start, end)
        span_inputs, hidden = [], inputs
        for span in route:
            span_inputs.append(hidden)
            span_prompts = prompts[span.start - start : span.end - start] if prompts is not None else None
            hidden = (await self.forward_span(span, hidden, span_prompts)).to(inputs.dtype)
        grad, grad_prompts = grad_outputs, []
        for span, span_input in zip(reversed(route), reversed(span_inputs)):
            span_prompts = prompts[span.start - start : span.end - start] if prompts is not None else None
            outputs = await self.backward_span(span, span_input, grad, span_prompts)
            grad = outputs[0].to(inputs.dtype)
            if prompts is not None:
                grad_prompts.insert(0, outputs[1])
        return grad, (torch.cat(grad_prompts) if prompts is not None else None)

    def inference_session(self, max_length: int, start: int, end: int, **kwargs) -> "InferenceSession":
        return InferenceSession(self, max_length, start, end, **kwargs)


class _ServerSession:
    """One rpc_inference stream to one server for one span of the route."""

    def __init__(self, client: SwarmClient, span: RemoteSpan, max_length: int, metadata: Optional[dict] = None):
        self.client = client
        self.span = span
        self.max_length = max_length
        self.session_id = str(uuid.uuid4())
        self.extra_metadata = metadata or {}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.responses: Optional[AsyncIterator] = None
        self.position = 0
        self.stepped = False

    async def _requests(self):
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item

    async def step(
        self, hidden: torch.Tensor, prompts=None, hypo_ids=None, start_from_position=None, step_id=None, timeout=60.0
    ):
        metadata: dict[str, Any] = {"session_id": self.session_id, "step_id": step_id or str(uuid.uuid4())}
        if not self.stepped:
            metadata.update(
                max_length=self.max_length, points=0.0, active_adapter=self.client.active_adapter, **self.extra_metadata
            )
        metadata["args_structure"] = ARGS_3
        metadata["start_from_position"] = self.position if start_from_position is None else start_from_position
        tensors = [
            hidden,
            prompts if prompts is not None else _empty(),
            hypo_ids if hypo_ids is not None else _empty(torch.int64),
        ]
        request = _request(self.client.uid(self.span.start, self.span.end), tensors, metadata)
        if self.responses is None:
            self.responses = await self.client.p2p.iterate_protobuf_handler(
                PeerID.from_base58(self.span.peer_id),
                PREFIX + "rpc_inference",
                self._requests(),
                runtime_pb2.ExpertResponse,
            )
        self.queue.put_nowait(request)
        self.stepped = True
        response = await asyncio.wait_for(self.responses.__anext__(), timeout)
        self.position = metadata["start_from_position"] + hidden.shape[1]
        return _decode(response.tensors[0])

    async def close(self) -> None:
        if self.responses is None:
            return
        self.queue.put_nowait(runtime_pb2.ExpertRequest())  # the close message
        self.queue.put_nowait(None)
        try:
            async for _ in self.responses:
                pass
        except Exception:
            pass


class InferenceSession:
    """Incremental inference through a chain of servers (one stream per span), like a Petals client."""

    def __init__(
        self,
        client: SwarmClient,
        max_length: int,
        start: int,
        end: int,
        route: Optional[list] = None,
        metadata: Optional[dict] = None,
    ):
        self.client = client
        self.metadata = metadata  # extra keys of the first step, e.g. {"alloc_timeout": 10}
        self.max_length = max_length
        self.start = start
        self.end = end
        self.route = route
        self.sessions: list[_ServerSession] = []
        self.position = 0

    async def __aenter__(self) -> "InferenceSession":
        route = self.route or await self.client.route(self.start, self.end)
        self.sessions = [_ServerSession(self.client, span, self.max_length, self.metadata) for span in route]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def step(
        self,
        hidden: torch.Tensor,
        prompts: Optional[torch.Tensor] = None,
        hypo_ids: Optional[torch.Tensor] = None,
        start_from_position: Optional[int] = None,
    ) -> torch.Tensor:
        step_id = str(uuid.uuid4())
        position = self.position if start_from_position is None else start_from_position
        for session in self.sessions:
            span_prompts = (
                prompts[session.span.start - self.start : session.span.end - self.start]
                if prompts is not None
                else None
            )
            hidden = (await session.step(hidden, span_prompts, hypo_ids, position, step_id)).to(hidden.dtype)
        self.position = position + hidden.shape[1]
        return hidden

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()


class Client:
    """Synchronous facade: each method runs the SwarmClient coroutine on a private loop thread."""

    def __init__(self, initial_peers: Sequence[str], dht_prefix: str):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="client-loop", daemon=True)
        self._thread.start()
        self.swarm: SwarmClient = self.run(SwarmClient.connect(initial_peers, dht_prefix))

    def run(self, coroutine, timeout: Optional[float] = 300):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def __getattr__(self, name):
        attr = getattr(self.swarm, name)
        if asyncio.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self.run(attr(*args, **kwargs))
        return attr

    def session(self, max_length: int, start: int, end: int, **kwargs) -> "SyncSession":
        return SyncSession(self, self.swarm.inference_session(max_length, start, end, **kwargs))

    def close(self) -> None:
        try:
            self.run(self.swarm.close(), timeout=10)
            self.run(self._cancel_leftovers(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    @staticmethod
    async def _cancel_leftovers() -> None:
        """hivemind leaves background tasks behind on shutdown; end them so the loop closes quietly."""
        current = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not current]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SyncSession:
    def __init__(self, client: Client, session: InferenceSession):
        self.client = client
        self.session = session

    def __enter__(self) -> "SyncSession":
        self.client.run(self.session.__aenter__())
        return self

    def __exit__(self, *exc) -> None:
        self.client.run(self.session.close())

    @property
    def position(self) -> int:
        return self.session.position

    def step(self, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.client.run(self.session.step(hidden, **kwargs))
