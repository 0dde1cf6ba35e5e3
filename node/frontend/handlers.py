"""The Petals RPCs (PROTOCOL 3): parse and check a request, run it on the runtime, encode the reply.

Registered by the frontend under `TransformerConnectionHandler.<name>`, unary or stream as Petals
clients call them. Raised exceptions become the client's error: `repr(e)` for unary calls and
`str(e)` in a stream's error frame.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from typing import AsyncIterator, Callable, Optional, Sequence

from hivemind.proto import runtime_pb2

from node.frontend.limits import Refused, RequestSizes, Scopes
from node.frontend.session import CacheMissing, InferenceStream, RuntimeReplaced, SessionBusy
from node.frontend.streams import Received
from protocol import SERVER_VERSION, rpc_info, wire
from protocol import request_checks as rq
from protocol.messages import (
    LATENCY_BUCKETS,
    SHUTTING_DOWN,
    Backward,
    Cancel,
    CapacityQuery,
    Failure,
    Forward,
    FrontendStats,
    LatencyHistogram,
    Message,
    PushRoute,
    ServingQuery,
    TensorMeta,
)
from protocol.plan import NodePlan
from protocol.requester import PeerUnavailable, Requester
from protocol.wire import RawTensor

NAME_PREFIX = "TransformerConnectionHandler."
UNARY = ("rpc_info", "rpc_forward", "rpc_backward", "rpc_push")
STREAMS = ("rpc_forward_stream", "rpc_backward_stream", "rpc_inference")
STREAM_PART_BYTES = 4 * 1024 * 1024


class ShuttingDown(RuntimeError):
    pass


MAX_REQUESTS_IN_FLIGHT = 1024  # RPCs one frontend handles at once (sessions included)
MAX_PUSHES = 64  # pushes to next servers under way at once; more are skipped (the client sends its own copy)
SERVING_TTL = 60.0  # seconds an answer of the announcer about a push target is trusted
NOT_SERVING_TTL = 5.0


class Handlers:
    def __init__(self, plan: NodePlan, runtime: Requester, allocator: Requester, announcer: Requester, log):
        self.plan = plan
        self.runtime = runtime
        self.allocator = allocator
        self.announcer = announcer
        self.log = log
        self.adapters: tuple[str, ...] = tuple(plan.adapters)
        self.block_schemas = rpc_info.block_schemas(plan.hidden_size, plan.torch_dtype, plan.compression)
        self.sessions: dict[str, "object"] = {}  # session_id -> InferenceStream, for rpc_push
        self.live: set = set()  # every open InferenceStream
        self.probe = None  # the actor's probe socket (procs/actor.py), for the steps `node.probe --follow` times
        self.p2p = None  # set by the frontend once attached; used to push to the next server
        self.in_flight = 0
        self.draining = False
        self.calls: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.recovered = 0  # sessions whose cache was rebuilt on a replaced runtime
        self.runtime_generation = 0  # runtimes replaced so far: a session's cache lives in one generation
        self.pushes: set[asyncio.Task] = set()
        self.serving: dict[tuple[str, int, int], tuple[bool, float]] = {}  # push targets: (serving, until)
        # per RPC (and per inference step), for node/supervisor/metrics.py
        self.latency: dict[str, LatencyHistogram] = {}
        largest = self.sizes().largest
        self.scopes = Scopes(
            total=plan.max_bytes_in_flight or 4 * largest, per_peer=plan.max_peer_bytes_in_flight or 2 * largest
        )

    def sizes(self) -> RequestSizes:
        """The most each kind of request can need now (the blocks served change with moves)."""
        plan = self.plan
        return RequestSizes(plan.hidden_size, plan.max_batch_size, plan.end_block - plan.start_block)

    def stream_sizes(self, rpc: str) -> tuple[int, Optional[int]]:
        """(one message, the whole stream) for node/frontend/streams.py: a forward or backward stream is one
        request in parts; an inference stream is a session of steps, each at most one step's size."""
        sizes = self.sizes()
        if rpc == "rpc_inference":
            return sizes.step, None
        total = sizes.forward if rpc == "rpc_forward_stream" else sizes.backward
        return total, total

    # --- bookkeeping shared by every RPC ------------------------------------------------------

    @contextlib.contextmanager
    def track(self, name: str, peer: str):
        if self.draining:
            raise ShuttingDown(SHUTTING_DOWN)
        if self.in_flight >= MAX_REQUESTS_IN_FLIGHT:
            message = f"the server is handling {self.in_flight} requests; retry later"
            self.refuse("requests", peer, message)
            raise Refused("requests", message)
        self.in_flight += 1
        self.calls[name] = self.calls.get(name, 0) + 1
        began = time.perf_counter()
        try:
            yield
        except BaseException as e:
            if not isinstance(e, (asyncio.CancelledError, GeneratorExit)):
                self.errors[name] = self.errors.get(name, 0) + 1
                self.log.info("request failed", rpc=name, error=str(e))
            raise
        finally:
            self.in_flight -= 1
            self.observe(name, time.perf_counter() - began)

    def observe(self, name: str, seconds: float) -> None:
        entry = self.latency.get(name)
        if entry is None:
            entry = self.latency[name] = LatencyHistogram([0] * (len(LATENCY_BUCKETS) + 1))
        entry.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        entry.sum += seconds
        entry.count += 1

    def refuse(self, reason: str, peer: str, detail: str) -> None:
        """Count a refusal by a limit (node_refused_total{reason}) and log it with the peer."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.log.info("refused", reason=reason, peer=peer, detail=detail)

    def push(self, work) -> None:
        """Run a push to the next server in the background, at most MAX_PUSHES at once."""
        if len(self.pushes) >= MAX_PUSHES:
            work.close()
            self.refuse("pushes", "", f"{len(self.pushes)} pushes under way; this one is skipped")
            return
        task = asyncio.get_running_loop().create_task(work)
        self.pushes.add(task)
        task.add_done_callback(self.pushes.discard)

    async def serves(self, peer: str, start: int, end: int) -> bool:
        """Whether the announcer's view of the swarm shows `peer` serving blocks [start, end)."""
        key = (peer, start, end)
        known = self.serving.get(key)
        now = time.monotonic()
        if known is not None and now < known[1]:
            return known[0]
        try:
            reply = await self.announcer.request(ServingQuery(self.announcer.next_id(), peer, start, end), timeout=10)
            serving = reply.msg.serving
        except (asyncio.TimeoutError, PeerUnavailable):
            return False  # the announcer is restarting: no push now, the client sends its own copy
        if len(self.serving) > 4096:  # peers come and go: forget them all rather than grow
            self.serving.clear()
        self.serving[key] = (serving, now + (SERVING_TTL if serving else NOT_SERVING_TTL))
        return serving

    def span(self, uid: str) -> rq.Span:
        return rq.parse_span(uid, self.plan.dht_prefix, self.plan.start_block, self.plan.end_block)

    async def call_runtime(self, msg: Message, tensors: Sequence[RawTensor], timeout: float) -> list[RawTensor]:
        """Run one task on the runtime; a vanished client or a timeout withdraws it from the queue.
        RuntimeReplaced if the runtime went away meanwhile (the caller decides how to go on)."""
        try:
            envelope = await self.runtime.request(msg, [t.data for t in tensors], timeout)
        except asyncio.TimeoutError:
            self.runtime.send(Cancel(msg.req))
            raise TimeoutError(f"the server did not finish the request within {timeout:.0f} s") from None
        except asyncio.CancelledError:
            self.runtime.send(Cancel(msg.req))
            raise
        except PeerUnavailable as e:
            raise RuntimeReplaced(str(e)) from None
        reply = envelope.msg
        if isinstance(reply, Failure):
            if reply.restarting:
                raise RuntimeReplaced(reply.error)
            if reply.cache_missing:
                raise CacheMissing(reply.error)
            raise RuntimeError(reply.error)
        if len(envelope.frames) != len(reply.tensors):
            raise RuntimeError("internal error: the runtime sent a malformed reply")
        return [RawTensor(m.dtype, tuple(m.shape), f.buffer) for m, f in zip(reply.tensors, envelope.frames)]

    def runtime_down(self) -> None:
        """The runtime (or a rank of its group) died: its replacement holds no session's cache."""
        self.runtime_generation += 1
        self.runtime.down("the block runtime restarted")

    async def runtime_back(self, generation: int, deadline: float) -> None:
        """After a RuntimeReplaced seen while `generation` was current: wait until that runtime is gone and
        its replacement ready, up to `deadline` (loop time); RuntimeError naming why if it does not come.
        A frontend that is stopping does not wait: its work fails with SHUTTING_DOWN."""
        if self.draining:
            raise ShuttingDown(SHUTTING_DOWN)
        loop = asyncio.get_running_loop()
        while self.runtime_generation == generation and loop.time() < deadline:
            await asyncio.sleep(0.05)  # the supervisor's PeerDown is on its way
        if not await self.runtime.wait_up(deadline - loop.time()):
            raise RuntimeError("the server's block runtime restarted and was not back in time; retry")

    async def call_surviving(self, make: Callable[[], Message], tensors: Sequence[RawTensor], timeout: float):
        """call_runtime, sent again to the runtime's replacement if the runtime is replaced meanwhile (a
        forward or backward holds no state in the runtime): the client sees only the delay."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            generation = self.runtime_generation
            left = deadline - asyncio.get_running_loop().time()
            try:
                return await self.call_runtime(make(), tensors, max(0.001, left))
            except RuntimeReplaced:
                await self.runtime_back(generation, deadline)

    def observe_recovery(self, seconds: float) -> None:
        self.recovered += 1
        self.observe("session_recovery", seconds)

    @staticmethod
    def metas(tensors: Sequence[RawTensor]) -> list[TensorMeta]:
        return [TensorMeta(t.dtype, tuple(t.shape)) for t in tensors]

    @staticmethod
    def encode(outputs: Sequence[RawTensor], compressions: Sequence[int]) -> list[runtime_pb2.Tensor]:
        return [wire.encode_tensor(t, c) for t, c in zip(outputs, compressions)]

    # --- rpc_info ------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context) -> runtime_pb2.ExpertInfo:
        with self.track("rpc_info", str(context.remote_id)):
            block = None
            if request.uid:
                if " " in request.uid:
                    raise KeyError(f"rpc_info takes one block uid, got the chain {request.uid!r}")
                self.span(request.uid)
                block = self.block_schemas
            capacity = await self.allocator.request_surviving(
                lambda: CapacityQuery(self.allocator.next_id()), timeout=30
            )
            payload = rpc_info.encode_rpc_info(
                version=SERVER_VERSION,
                dht_client_mode=False,
                cache_tokens_available=capacity.msg.tokens_available,
                block=block,
            )
            return runtime_pb2.ExpertInfo(serialized_info=payload)

    # --- forward and backward ----------------------------------------------------------------

    async def forward(self, uid: str, tensors: list, metadata: dict, peer: str) -> list[runtime_pb2.Tensor]:
        span = self.span(uid)
        points = rq.check_points(metadata)
        adapter = rq.active_adapter(metadata, self.adapters)
        hidden, prompts = rq.positional(rq.declared_tensors(tensors), metadata, names=("hidden_states", "prompts"))
        batch, length = rq.hidden_shape(hidden, "hidden_states", self.plan.hidden_size, self.plan.max_batch_size)
        rq.prompts(prompts, span.length, batch, length, self.plan.hidden_size)
        hidden, prompts = rq.decode(hidden, prompts)
        compressions = rq.output_compression(metadata, 1, self.plan.compression)
        metas = self.metas([hidden, prompts])

        def make() -> Forward:
            return Forward(self.runtime.next_id(), span.start, span.end, metas, adapter, peer, points)

        outputs = await self.call_surviving(make, [hidden, prompts], self.plan.request_timeout)
        return self.encode(outputs, compressions)

    async def backward(self, uid: str, tensors: list, metadata: dict, peer: str) -> list[runtime_pb2.Tensor]:
        span = self.span(uid)
        points = rq.check_points(metadata)
        adapter = rq.active_adapter(metadata, self.adapters)
        inputs, grad_outputs, prompts = rq.positional(
            rq.declared_tensors(tensors), metadata, names=("inputs", "grad_outputs", "prompts")
        )
        batch, length = rq.hidden_shape(inputs, "inputs", self.plan.hidden_size, self.plan.max_batch_size)
        rq.grad_outputs(grad_outputs, inputs)
        rq.prompts(prompts, span.length, batch, length, self.plan.hidden_size)
        inputs, grad_outputs, prompts = rq.decode(inputs, grad_outputs, prompts)
        n_outputs = 1 if rq.optional_tensor(prompts) is None else 2
        compressions = rq.output_compression(metadata, n_outputs, self.plan.compression)
        metas = self.metas([inputs, grad_outputs, prompts])

        def make() -> Backward:
            return Backward(self.runtime.next_id(), span.start, span.end, metas, adapter, peer, points)

        outputs = await self.call_surviving(make, [inputs, grad_outputs, prompts], self.plan.request_timeout)
        return self.encode(outputs, compressions)

    @contextlib.asynccontextmanager
    async def reserved(self, peer: str, nbytes: int):
        """A unary request's bytes, held in the scopes while it is handled (p2pd delivers it whole)."""
        try:
            await self.scopes.reserve(peer, nbytes)
        except Refused as e:
            self.refuse(e.reason, peer, str(e))
            raise
        try:
            yield
        finally:
            self.scopes.release(peer, nbytes)

    async def _unary(
        self, rpc: str, compute, request: runtime_pb2.ExpertRequest, context
    ) -> runtime_pb2.ExpertResponse:
        """rpc_forward and rpc_backward: one request, its bytes reserved while `compute` handles it."""
        peer = str(context.remote_id)
        with self.track(rpc, peer):
            async with self.reserved(peer, request.ByteSize()):
                metadata = wire.unpack_metadata(request.metadata)
                work = compute(request.uid, list(request.tensors), metadata, peer)
                return runtime_pb2.ExpertResponse(tensors=await asyncio.wait_for(work, self.plan.request_timeout))

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        return await self._unary("rpc_forward", self.forward, request, context)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        return await self._unary("rpc_backward", self.backward, request, context)

    async def _collect(self, requests: AsyncIterator[Received]) -> tuple[str, dict, list]:
        """A *_stream request: uid and metadata from the first part, tensors reassembled from all parts (their
        bytes stay reserved until the stream ends)."""
        uid, metadata, assembler = None, None, wire.StreamAssembler()
        tensors = []
        async for received in requests:
            part = received.request
            if uid is None:
                uid, metadata = part.uid, wire.unpack_metadata(part.metadata)
            elif part.uid != uid:
                raise ValueError(f"stream parts name different blocks: {uid!r} then {part.uid!r}")
            tensors.extend(assembler.feed(part.tensors))
        if uid is None:
            raise ValueError("the stream ended before any request arrived")
        assembler.finish()
        return uid, metadata, tensors

    async def _collected(self, run, requests, peer: str) -> list[runtime_pb2.Tensor]:
        uid, metadata, tensors = await self._collect(requests)
        return await run(uid, tensors, metadata, peer)

    async def _stream_reply(self, tensors: list[runtime_pb2.Tensor]) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        for tensor in tensors:
            for part in wire.split_for_stream(tensor, STREAM_PART_BYTES):
                yield runtime_pb2.ExpertResponse(tensors=[part])

    async def _streamed(self, rpc: str, compute, requests, context) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """rpc_forward_stream and rpc_backward_stream: one request in parts, its reply in parts."""
        peer = str(context.remote_id)
        with self.track(rpc, peer):
            outputs = await asyncio.wait_for(self._collected(compute, requests, peer), self.plan.request_timeout)
            async for response in self._stream_reply(outputs):
                yield response

    def rpc_forward_stream(self, requests, context) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return self._streamed("rpc_forward_stream", self.forward, requests, context)

    def rpc_backward_stream(self, requests, context) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return self._streamed("rpc_backward_stream", self.backward, requests, context)

    # --- inference and push ------------------------------------------------------------------

    async def rpc_inference(self, requests, context) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self.track("rpc_inference", str(context.remote_id)):
            session = InferenceStream(self, str(context.remote_id))
            async for response in session.run(requests):
                yield response

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        with self.track("rpc_push", str(context.remote_id)):
            self.span(request.uid)
            metadata = wire.unpack_metadata(request.metadata)
            session_id = metadata.get("session_id")
            if not isinstance(session_id, str) or not session_id:
                raise ValueError("rpc_push needs metadata.session_id")
            session_id = rq.identifier(metadata, "session_id")
            local = self.sessions.get(session_id)
            if local is not None:
                try:
                    local.push(request)
                except SessionBusy as e:
                    self.refuse("session_queue", str(context.remote_id), str(e))
                    raise
            else:  # the session may live in another frontend process; the allocator knows which
                self.allocator.send(PushRoute(session_id), [request.SerializeToString()])
            return runtime_pb2.ExpertResponse()

    def deliver_push(self, session_id: str, payload: bytes) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            return
        request = runtime_pb2.ExpertRequest()
        try:
            request.ParseFromString(payload)
        except Exception:
            self.log.warning("undecodable pushed request", session=session_id)
            return
        try:
            session.push(request)
        except SessionBusy as e:  # routed from another frontend: its pusher was already answered
            self.refuse("session_queue", "", str(e))

    def stats(self) -> FrontendStats:
        """A copy: the heartbeat is encoded on another thread while the counts go on."""
        return FrontendStats(
            in_flight=self.in_flight,
            sessions=len(self.sessions),
            calls=dict(self.calls),
            errors=dict(self.errors),
            refused=dict(self.refused),
            recovered=self.recovered,
            history_bytes=sum(s.history.nbytes for s in self.live if s.history is not None),
            bytes_in_flight=self.scopes.used,
            latency={name: LatencyHistogram(list(h.buckets), h.sum, h.count) for name, h in self.latency.items()},
        )
