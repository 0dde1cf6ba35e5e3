"""The Petals RPCs (PROTOCOL 3): read and check a request, run it on the runtime, encode the reply.

Served under `TransformerConnectionHandler.<name>`, unary or stream as Petals clients call them, on what
the stream keeper (procs/keeper.py) relays: rpc_inference's frames as they come, the other calls whole
(a forward or backward stream's parts together). Raised exceptions become the client's error: `repr(e)`
for unary calls and `str(e)` in a stream's error frame. What the RPCs share lives beside: the runtime link
(runtime_link.py), the open sessions (open_sessions.py), pushes to the next servers (pushes.py), the
counters (counters.py) and the byte scopes (limits.py); one rpc_inference stream is session.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Optional

from hivemind.proto import runtime_pb2

from node.frontend.counters import Counters
from node.frontend.errors import SessionBusy, ShuttingDown
from node.frontend.limits import Refused, RequestSizes, Scopes
from node.frontend.open_sessions import OpenSessions
from node.frontend.pushes import Pushes
from node.frontend.runtime_link import RuntimeLink
from node.frontend.session import InferenceStream, SessionServices
from protocol import SERVER_VERSION, rpc_info, wire
from protocol import request_checks as rq
from protocol.messages import SHUTTING_DOWN, Backward, CapacityQuery, Forward, FrontendStats, PushRoute
from protocol.plan import NodePlan
from protocol.requester import Requester

NAME_PREFIX = "TransformerConnectionHandler."
KEPT = "rpc_inference"  # a stream that the stream keeper holds (procs/keeper.py) and relays frame by frame
STREAM_PART_BYTES = 4 * 1024 * 1024
MAX_REQUESTS_IN_FLIGHT = 1024  # RPCs one frontend handles at once (sessions included)
DRAIN_LOG_PERIOD = 10.0  # seconds between the log lines of a drain
SESSION_WORK = ("rpc_inference", "rpc_push")  # calls that serve an open session (ended by the session's rules)


def grace_over(grace: float) -> str:
    return f"{SHUTTING_DOWN} (its --shutdown_grace of {grace:.0f} s ended before this session did)"


class Rpcs:
    def __init__(self, plan: NodePlan, runtime: Requester, allocator: Requester, announcer: Requester, log, probe=None):
        self.plan = plan
        self.log = log
        self.allocator = allocator
        self.runtime = RuntimeLink(runtime, stopping=lambda: self.cut_off)
        self.counters = Counters(log)
        self.sessions = OpenSessions()
        self.pushes = Pushes(plan, log, announcer, self.counters)
        # probe: the actor's probe socket (procs/actor.py), for the steps `node.probe --follow` times
        self.services = SessionServices(
            plan, log, allocator, self.runtime, self.sessions, self.counters, self.pushes, probe
        )
        self.block_schemas = rpc_info.block_schemas(plan.hidden_size, plan.torch_dtype, plan.compression)
        self.in_flight = 0
        self.draining = False  # new calls are refused; open sessions are served until they end or the grace does
        self.drain_deadline = 0.0  # time.monotonic() when the grace ends
        self.cut_off = False  # the grace is over: what is still open gets its final error
        # the tasks of calls under way that are not a session's (forward, backward, info): at a drain's end
        # they are cancelled into their final error (`cut_calls`), not cut off by our exit without a reply
        self.calls: set[asyncio.Task] = set()
        self.cutting = False  # cut_calls cancels them (not cut_off: a retiring frontend's sessions go on)
        self.scopes = Scopes.of(plan)

    def attached(self, p2p) -> None:
        """The frontend is attached to p2pd: pushes go out through it."""
        self.pushes.p2p = p2p

    def sizes(self) -> RequestSizes:
        return RequestSizes.of(self.plan)

    def stream_sizes(self, rpc: str) -> tuple[int, Optional[int]]:
        """(one message, the whole stream) for node/frontend/streams.py (RequestSizes.stream)."""
        return self.sizes().stream(rpc)

    def refuse(self, reason: str, peer: str, detail: str) -> None:
        self.counters.refuse(reason, peer, detail)

    # --- bookkeeping shared by every RPC ------------------------------------------------------

    @contextlib.contextmanager
    def track(self, name: str, peer: str, new_work: bool = True):
        """Counts a call while it runs; refused while draining unless it serves an open session (a push)."""
        if self.draining and (new_work or self.cut_off):
            raise ShuttingDown(SHUTTING_DOWN)
        if self.in_flight >= MAX_REQUESTS_IN_FLIGHT:
            message = f"the server is handling {self.in_flight} requests; retry later"
            self.refuse("requests", peer, message)
            raise Refused("requests", message)
        self.in_flight += 1
        self.counters.call(name)
        began = time.perf_counter()
        task = None if name in SESSION_WORK else asyncio.current_task()
        if task is not None:
            self.calls.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if task is not None and self.cutting:  # cancelled by cut_calls: the caller gets the reason
                error = ShuttingDown(f"{SHUTTING_DOWN} (the call outlived the time given to calls under way)")
                self.counters.error(name, error)
                raise error from None
            raise
        except BaseException as e:
            if not isinstance(e, GeneratorExit):
                self.counters.error(name, e)
            raise
        finally:
            self.calls.discard(task)
            self.in_flight -= 1
            self.counters.observe(name, time.perf_counter() - began)

    @staticmethod
    def encode(outputs, compressions) -> list[runtime_pb2.Tensor]:
        return [wire.encode_tensor(t, c) for t, c in zip(outputs, compressions)]

    # --- rpc_info ------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context) -> runtime_pb2.ExpertInfo:
        with self.track("rpc_info", str(context.remote_id)):
            block = None
            if request.uid:
                if " " in request.uid:
                    raise KeyError(f"rpc_info takes one block uid, got the chain {request.uid!r}")
                rq.parse_span(request.uid, self.plan.dht_prefix, self.plan.start_block, self.plan.end_block)
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
        return await self._blocks(Forward, rq.forward_request(uid, tensors, metadata, self.plan), peer)

    async def backward(self, uid: str, tensors: list, metadata: dict, peer: str) -> list[runtime_pb2.Tensor]:
        return await self._blocks(Backward, rq.backward_request(uid, tensors, metadata, self.plan), peer)

    async def _blocks(self, kind: type, call: rq.BlocksCall, peer: str) -> list[runtime_pb2.Tensor]:
        """A checked forward or backward (`kind`: its message) on the runtime, sent again to a replacement."""
        metas, span = self.runtime.metas(call.tensors), call.span

        def make():
            return kind(self.runtime.next_id(), span.start, span.end, metas, call.adapter, peer, call.points)

        outputs = await self.runtime.call_surviving(make, call.tensors, self.plan.request_timeout)
        return self.encode(outputs, call.compressions)

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

    async def _collect(self, parts: list[runtime_pb2.ExpertRequest]) -> tuple[str, dict, list]:
        """A *_stream request: uid and metadata from the first part, tensors reassembled from all parts."""
        if not parts:
            raise ValueError("the stream ended before any request arrived")
        uid, metadata, assembler = parts[0].uid, wire.unpack_metadata(parts[0].metadata), wire.StreamAssembler()
        tensors = []
        for part in parts:
            if part.uid != uid:
                raise ValueError(f"stream parts name different blocks: {uid!r} then {part.uid!r}")
            tensors.extend(assembler.feed(part.tensors))
        assembler.finish()
        return uid, metadata, tensors

    async def streamed_call(self, rpc: str, frames: list[bytes], context) -> list[runtime_pb2.ExpertResponse]:
        """rpc_forward_stream or rpc_backward_stream, read whole by the keeper (`frames`: its parts, serialized
        ExpertRequests, within the request's size limit): the reply's parts. The parts' bytes are reserved
        here too while the call is handled, as for a unary call."""
        peer = str(context.remote_id)
        compute = {"rpc_forward_stream": self.forward, "rpc_backward_stream": self.backward}[rpc]
        with self.track(rpc, peer):
            async with self.reserved(peer, sum(len(frame) for frame in frames)):
                parts = []
                for frame in frames:
                    part = runtime_pb2.ExpertRequest()
                    try:
                        part.ParseFromString(frame)
                    except Exception:
                        raise ValueError(f"malformed ExpertRequest ({len(frame)} bytes could not be parsed)") from None
                    parts.append(part)
                uid, metadata, tensors = await self._collect(parts)
                del parts
                outputs = await asyncio.wait_for(compute(uid, tensors, metadata, peer), self.plan.request_timeout)
                return [
                    runtime_pb2.ExpertResponse(tensors=[part])
                    for tensor in outputs
                    for part in wire.split_for_stream(tensor, STREAM_PART_BYTES)
                ]

    # --- inference and push ------------------------------------------------------------------

    async def rpc_inference(self, requests, context) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self.track("rpc_inference", str(context.remote_id)):
            session = InferenceStream(self.services, str(context.remote_id), getattr(context, "kept", None))
            async for response in session.run(requests):
                yield response

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        with self.track("rpc_push", str(context.remote_id), new_work=False):
            rq.parse_span(request.uid, self.plan.dht_prefix, self.plan.start_block, self.plan.end_block)
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
        """A push that another frontend received for one of our sessions (routed by the allocator)."""
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

    # --- stopping ----------------------------------------------------------------------------

    async def drain(self, grace: float, refuse: bool = True, hand_over: bool = False) -> int:
        """A graceful stop: new calls are refused with SHUTTING_DOWN (a Petals client takes them elsewhere,
        and a session refused at its first step costs it nothing), while every open session is served until
        its client closes it and every call under way finishes, for at most `grace` seconds (`cut` ends it
        sooner). Then what is still open is ended with a final error. Gives the number of calls cut off.
        A retiring frontend (a reload) does not refuse: p2pd sends it nothing new, and a call it had just
        handed over before the handlers left is served, not failed."""
        self.draining = refuse
        self.drain_deadline = min(self.drain_deadline or float("inf"), time.monotonic() + grace)
        next_log = 0.0
        while self.in_flight and time.monotonic() < self.drain_deadline:
            now = time.monotonic()
            if now >= next_log:
                next_log = now + DRAIN_LOG_PERIOD
                self.log.info(
                    "draining",
                    sessions=len(self.sessions),
                    in_flight=self.in_flight,
                    seconds_left=round(self.drain_deadline - now, 1),
                )
            await asyncio.sleep(0.05)
        if hand_over and self.in_flight:
            return await self._hand_over()
        self.cut_off = True
        unfinished = self.in_flight
        if unfinished:
            self.sessions.abort_all(ShuttingDown(grace_over(grace)))  # each ends after its current step
            # Fail what still waits so that its callers get an error reply now. Work cut off by our exit
            # gets no reply at all, and p2pd keeps its callers waiting.
            deadline = time.monotonic() + 1.0
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.runtime.requester.fail_all(SHUTTING_DOWN)
            self.allocator.fail_all(SHUTTING_DOWN)
            deadline = time.monotonic() + 1.0
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await self.cut_calls()  # what waits on no other actor (a stream still being sent, say)
            await asyncio.sleep(0.1)  # the error replies leave through p2pd
        return unfinished

    async def cut_calls(self) -> int:
        """The calls under way that serve no session get their final error now, whatever they wait for (our
        exit would end them without a reply, and p2pd keeps a unary caller waiting for its own timeout).
        Gives their number."""
        self.cutting = True
        cut = [task for task in self.calls if not task.done()]
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.wait(cut, timeout=1.0)
        return len(cut)

    async def _hand_over(self) -> int:
        """A retirement's end: the inference sessions are left as they are (the keeper holds every one's
        stream, and hands it to another frontend when this process exits: a slower step, as after a crash);
        the other calls get a second more, then their final error (`cut_calls`). Gives their number."""
        deadline = time.monotonic() + 1.0
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = await self.cut_calls()
        if cut:
            await asyncio.sleep(0.1)  # the error replies leave through p2pd
        return cut

    def cut(self) -> None:
        """A second stop: end the drain now."""
        self.drain_deadline = time.monotonic()

    def stats(self) -> FrontendStats:
        """A copy: the heartbeat is encoded on another thread while the counts go on."""
        c = self.counters
        return FrontendStats(
            in_flight=self.in_flight,
            sessions=len(self.sessions.by_id),
            calls=dict(c.calls),
            errors=dict(c.errors),
            refused=dict(c.refused),
            recovered=c.recovered,
            history_bytes=self.sessions.history_bytes(),
            bytes_in_flight=self.scopes.used,
            latency=c.latency_copy(),
        )
