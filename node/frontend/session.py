"""One rpc_inference stream (PROTOCOL 3.6, 3.7): open, step, close, and free the cache whatever happens.

The first message fixes the blocks, batch size, max_length and args_structure and reserves the
cache with the allocator. Every later message is one step: de-duplicated by step_id, positioned by
start_from_position (rollback), run by the runtime against this session's cache handle. Steps come
from the client's stream and, for v2.2.0 clients, from rpc_push; both land in one queue of at most
QUEUED_STEPS: the client's stream is read no further while it is full (backpressure, not buffering),
and a push into a full queue is refused.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from hivemind.proto import runtime_pb2

from node.frontend.counters import Counters
from node.frontend.errors import RuntimeLostCache, RuntimeReplaced, SessionBusy
from node.frontend.history import History, HistoryLost, last_positions
from node.frontend.kept import KeptStream, log_budget
from node.frontend.open_sessions import OpenSessions
from node.frontend.pushes import Pushes
from node.frontend.runtime_link import RuntimeLink
from node.frontend.streams import Received
from node.frontend.time_limit import within
from protocol import request_checks as rq
from protocol import wire
from protocol.messages import Adopt, Allocate, Failure, GrowHistory, InferStep, Release
from protocol.plan import NodePlan
from protocol.requester import PeerUnavailable, Requester
from protocol.wire import ITEMSIZE, RawTensor

_CLIENT, _PUSH, _END, _ERROR = "client", "push", "end", "error"
QUEUED_STEPS = 4  # steps waiting in a session: a client sends one at a time, a push races it with a copy
NOT_REBUILT = "this session cannot be rebuilt after the server's runtime restarted"
REMEMBERED_STEPS = 16  # step_ids kept to drop the second copy of a step (the push and the client's own)


@dataclass
class SessionServices:
    """What a session uses of its frontend (node/frontend/rpcs.py makes one for all its sessions)."""

    plan: NodePlan
    log: Any
    allocator: Requester
    runtime: RuntimeLink
    sessions: OpenSessions
    counters: Counters
    pushes: Pushes
    probe: Any = None  # the actor's probe socket (procs/actor.py), or None


class InferenceStream:
    def __init__(self, services: SessionServices, peer: str, kept: Optional[KeptStream] = None):
        self.services = services
        self.kept = kept  # the stream keeper holds the stream (node/frontend/kept.py): it is told what is handled
        self.client_messages = 0  # read from the client so far
        self.replaying = False  # the message being handled was answered by a frontend that died
        self.plan = services.plan
        self.log = services.log
        self.peer = peer
        self.incoming: asyncio.Queue = asyncio.Queue()  # steps (at most QUEUED_STEPS), then the end or an error
        self.queued = 0  # steps in `incoming`
        self.room = asyncio.Event()  # set while another step fits
        self.room.set()
        self.opened: Optional[rq.SessionOpen] = None
        self.named: Optional[str] = None  # the session_id this stream reserved in the frontend's registry
        self.handle: Optional[int] = None
        self.prefix = 0
        self.steps_done: collections.deque[str] = collections.deque(maxlen=REMEMBERED_STEPS)
        self.deadline = time.monotonic() + self.plan.session_timeout
        self.lease_deadline = 0.0
        self.pushed = False  # whether the request being handled came from rpc_push
        self.current: Optional[Received] = None  # the client's step being handled: its bytes are held until done
        self.history: Optional[History] = None  # what a new runtime needs to rebuild the cache
        self.cache_generation = 0  # the runtime generation (RuntimeLink.generation) that holds the cache

    def push(self, request: runtime_pb2.ExpertRequest) -> None:
        if self.queued >= QUEUED_STEPS:
            raise SessionBusy(f"session {self._sid} has {self.queued} steps waiting; the pushed step is dropped")
        if self.kept is not None and self.client_messages < self.kept.replayed:
            # taken over from a frontend that died, and its history not yet all recorded again: the step
            # would run at the wrong position, and the client's own copy of it would be dropped
            raise SessionBusy(f"session {self._sid} is being taken over; the pushed step is dropped")
        self._enqueue(_PUSH, request)

    def _enqueue(self, kind: str, request) -> None:
        self.queued += 1
        if self.queued >= QUEUED_STEPS:
            self.room.clear()
        self.incoming.put_nowait((kind, request))

    def abort(self, error: Exception) -> None:
        """End the session after its current step: the client gets `error`."""
        self.incoming.put_nowait((_ERROR, error))

    async def run(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        reader = asyncio.get_running_loop().create_task(self._read_client(requests))
        self.services.sessions.opened(self)
        try:
            request = await self._next()
            if request is None:
                return
            await self._open(request)
            while request.tensors or self.pushed:  # an empty request from the client is its close message
                if self.replaying:
                    await self._restore(request)
                    self.kept.handled += 1
                    request = await self._next()
                    if request is None:
                        return
                    continue
                self._trace("in", "ClientStep", pushed=self.pushed)
                try:
                    response = await self._step_or_drop(request)
                except Exception as e:
                    self._trace("out", "ClientError", error=str(e)[:200])
                    raise
                self._trace("out", "ClientReply", answered=response is not None)
                if self.kept is not None:
                    if not self.pushed:
                        self.kept.step_handled(answered=response is not None)
                    elif response is not None:  # the client's own copy may be handled after: a replay could
                        self.kept.keep(0)  # not tell which of the two the client was answered for
                if response is not None:
                    yield response
                request = await self._next()
                if request is None:
                    return
        finally:
            reader.cancel()
            self._close()

    def _trace(self, direction: str, type_: str, **fields) -> None:
        """For `node.probe --follow`: when the frontend took a step from its client and answered it
        (these are not ZeroMQ messages, so no channel observer publishes them). A client's own step names
        its message on the keeper's stream, as the keeper's ClientMessage and ClientFrame events do."""
        probe = self.services.probe
        if probe is not None and probe.active:
            if self.kept is not None and not self.pushed:
                fields.update(stream=self.kept.stream, message=self.client_messages)
            probe.publish(direction, type_, self._sid, fields=fields)

    # --- receiving ---------------------------------------------------------------------------

    async def _read_client(self, requests) -> None:
        try:
            async for received in requests:
                await self.room.wait()  # backpressure: the stream is read no further until a step fits
                self._enqueue(_CLIENT, received)
            await self.incoming.put((_END, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self.incoming.put((_ERROR, e))

    async def _next(self) -> Optional[runtime_pb2.ExpertRequest]:
        """The next step from the client or a push; None when the stream ended or the client went quiet."""
        if self.current is not None:  # the step before is done: its bytes are free
            self.current.release()
            self.current = None
        expired = TimeoutError(f"the session exceeded session_timeout ({self.plan.session_timeout:.0f} s)")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise expired
        try:
            kind, item = await within(self.incoming.get(), min(self.plan.step_timeout, left))
        except asyncio.TimeoutError:
            if time.monotonic() >= self.deadline:
                raise expired from None
            self.log.info("inference step timeout", session=self._sid, peer=self.peer, timeout=self.plan.step_timeout)
            return None
        if kind == _ERROR:
            raise item
        if kind in (_CLIENT, _PUSH):
            self.queued -= 1
            self.room.set()
        self.pushed = kind == _PUSH
        self.replaying = False  # a push is never one the client was answered for
        if kind == _CLIENT:
            self.client_messages += 1
            self.replaying = self.kept is not None and self.client_messages <= self.kept.replayed
            self.current = item
            return item.request
        return item

    # --- opening and closing -----------------------------------------------------------------

    @property
    def _sid(self) -> str:
        return self.opened.session_id if self.opened else ""

    async def _open(self, request: runtime_pb2.ExpertRequest) -> None:
        metadata = wire.unpack_metadata(request.metadata)
        opened = rq.session_open(request, metadata, self.plan)
        if opened.session_id and opened.session_id in self.services.sessions:
            raise ValueError(f"session_id {opened.session_id} is already open on this server")
        if opened.session_id:  # reserved before the allocator is asked: asking again can only be a retry
            self.named = opened.session_id
            self.services.sessions.named(opened.session_id, self)
        allocator = self.services.allocator
        timeout = min(opened.alloc_timeout, self.plan.max_alloc_timeout)
        lease = self.deadline - time.monotonic() + 30

        def allocate() -> Allocate:
            o = opened
            resumed = self.kept is not None and self.kept.handed_over
            return Allocate(
                allocator.next_id(),
                o.session_id,
                o.batch,
                o.max_length,
                o.span.length,
                timeout,
                lease,
                peer=self.peer,
                resumed=resumed,
            )

        try:  # an allocator replaced meanwhile is asked again: the client sees only the delay
            reply = (await allocator.request_surviving(allocate, timeout=timeout + 30)).msg
        except (asyncio.TimeoutError, PeerUnavailable) as e:
            raise RuntimeError(f"could not reach the cache allocator ({e or 'timeout'}); retry") from None
        if isinstance(reply, Failure):
            raise RuntimeError(reply.error)
        self.opened, self.handle = opened, reply.handle
        self.history = History(
            opened.batch, opened.max_length, self.plan.hidden_size, self.plan.torch_dtype, reply.history
        )
        self.cache_generation = self.services.runtime.generation  # the cache is made by the first step
        self.lease_deadline = time.monotonic() + lease
        self._keep()
        self.log.info(
            "session opened",
            session=opened.session_id,
            peer=self.peer,
            blocks=[opened.span.start, opened.span.end],
            batch=opened.batch,
            max_length=opened.max_length,
        )

    def _keep(self) -> None:
        """Tell the keeper how much of this session's messages to log: as much as its history holds."""
        if self.kept is not None:
            held = self.history.reserved if self.history.lost is None else 0
            self.kept.keep(log_budget(held, ITEMSIZE[self.plan.torch_dtype], self.opened.max_length))

    def adopt_message(self) -> Optional[Adopt]:
        """Our grant, told again to an allocator that restarted and lost its books."""
        if self.handle is None:
            return None
        o = self.opened
        expires_in = self.lease_deadline - time.monotonic()
        return Adopt(
            self.handle,
            o.session_id,
            o.batch,
            o.max_length,
            o.span.length,
            expires_in,
            peer=self.peer,
            history=self.history.reserved,
        )

    def _close(self) -> None:
        self.services.sessions.closed(self, self.named)
        if self.current is not None:
            self.current.release()
            self.current = None
        if self.handle is not None:
            self.services.allocator.send(Release(self.handle))
            self.handle = None
        if self.opened:
            self.log.info("session closed", session=self.opened.session_id, peer=self.peer, tokens=self.prefix)

    # --- stepping ----------------------------------------------------------------------------

    async def _step_or_drop(self, request: runtime_pb2.ExpertRequest) -> Optional[runtime_pb2.ExpertResponse]:
        """A client's step; a pushed one that is empty or fails is dropped, not the session's end.

        A push only races the client's own copy of the step (PROTOCOL 3.7), and anyone who knows the
        session_id can send one: a broken upstream server must not end the client's session.
        """
        if not self.pushed:
            began = time.perf_counter()
            response = await self._step(request)
            self.services.counters.observe("inference_step", time.perf_counter() - began)
            return response
        try:
            return await self._step(request) if request.tensors else None
        except Exception as e:
            self.log.info("pushed step dropped", session=self._sid, error=str(e))
            return None

    async def _step(self, request: runtime_pb2.ExpertRequest) -> Optional[runtime_pb2.ExpertResponse]:
        metadata = wire.unpack_metadata(request.metadata)
        step_id = rq.identifier(metadata, "step_id")
        if step_id and step_id in self.steps_done:
            return None  # a push and the client's own copy of one step: the second is dropped
        step = rq.inference_step(request, metadata, self.opened, self.prefix, self.plan)
        timeout = max(0.001, min(self.plan.request_timeout, self.deadline - time.monotonic()))
        output = await self._run(step.position, step.tensors, step.step_id, timeout)
        prompts = await self._record(step)
        encoded = wire.encode_tensor(output, self.plan.compression)
        if step.next_servers and prompts is None:
            self.services.pushes.push_next(encoded, request, metadata, step.next_servers, self.peer)
        return runtime_pb2.ExpertResponse(tensors=[encoded])

    async def _record(self, step: rq.InferenceStep) -> Optional[RawTensor]:
        """A step done: its inputs join the history, its step_id the ones seen. Gives its deep prompts."""
        prompts, hypo_ids = rq.optional_tensor(step.prompts), rq.optional_tensor(step.hypo_ids)
        await self._reserve_history(step.position, prompts)
        self.history.record(step.position, step.hidden, prompts, hypo_ids)
        self.prefix = step.position + step.length
        if step.step_id:
            self.steps_done.append(step.step_id)
        return prompts

    async def _restore(self, request: runtime_pb2.ExpertRequest) -> None:
        """A step that a frontend which died had answered (the keeper handed its stream to us): recorded,
        not run, and the next step rebuilds the cache from the history, as after a runtime restart."""
        metadata = wire.unpack_metadata(request.metadata)
        step_id = rq.identifier(metadata, "step_id")
        if step_id and step_id in self.steps_done:
            return
        await self._record(rq.inference_step(request, metadata, self.opened, self.prefix, self.plan))
        self.cache_generation = -1

    async def _reserve_history(self, position: int, prompts: Optional[RawTensor]) -> None:
        """Deep prompts are kept beside the hidden states the session opened with room for: their bytes are
        reserved with the allocator before they are kept, or the session's history is given up (it is
        served on, but cannot be rebuilt)."""
        history = self.history
        if prompts is None or history.lost is not None:
            return
        need = history.bytes_with(position, prompts)
        if need <= history.reserved:
            return
        allocator = self.services.allocator

        def grow() -> GrowHistory:
            return GrowHistory(allocator.next_id(), self.handle, need)

        try:
            reply = (await allocator.request_surviving(grow, timeout=10)).msg
        except (asyncio.TimeoutError, PeerUnavailable) as e:
            reply = Failure(0, f"the cache allocator did not answer ({e or 'timeout'})")
        if isinstance(reply, Failure):
            history.forget(f"its deep prompts were not kept: {reply.error}")
            self.log.info("session history given up", session=self._sid, peer=self.peer, reason=reply.error)
        else:
            history.reserved = need
            self._keep()

    def _infer_step(self, position: int, tensors: list, step_id: str) -> InferStep:
        o = self.opened
        return InferStep(
            req=self.services.runtime.next_id(),
            session=o.session_id,
            handle=self.handle,
            start=o.span.start,
            end=o.span.end,
            position=position,
            max_length=o.max_length,
            batch=o.batch,
            tensors=self.services.runtime.metas(tensors),
            step=step_id,
            adapter=o.adapter,
            peer=self.peer,
        )

    async def _run(self, position: int, tensors: list, step_id: str, timeout: float) -> RawTensor:
        """The step on the runtime. If the runtime was replaced since this session's cache was made, or is
        replaced while it holds the step, the cache is rebuilt on its replacement first (DESIGN section 4):
        the client sees one slower step, then the same outputs it would have got."""
        runtime, loop = self.services.runtime, asyncio.get_running_loop()
        deadline = loop.time() + timeout
        recovering: Optional[float] = None
        rebuilt_for_missing = False
        while True:
            generation = runtime.generation
            try:
                output = None
                if self.cache_generation != generation:
                    recovering = recovering or time.perf_counter()
                    output = await self._rebuild(max(0.001, deadline - loop.time()), position, tensors, step_id)
                    self.cache_generation = generation
                if output is None:
                    msg = self._infer_step(position, tensors, step_id)
                    (output,) = await runtime.call(msg, tensors, max(0.001, deadline - loop.time()), self._spent)
            except RuntimeReplaced:
                recovering = recovering or time.perf_counter()
                await runtime.back(generation, deadline)
                continue
            except RuntimeLostCache:  # the step reached a new runtime before the news of its start did
                if rebuilt_for_missing:
                    raise
                rebuilt_for_missing, recovering = True, recovering or time.perf_counter()
                self.cache_generation = -1  # rebuild now, whatever the generation says
                continue
            if recovering is not None:
                seconds = time.perf_counter() - recovering
                self.services.counters.recovery(seconds)
                self.log.info(
                    "session recovered",
                    session=self._sid,
                    peer=self.peer,
                    tokens=self.history.length,
                    seconds=round(seconds, 3),
                )
            return output

    def _spent(self, compute_us: int) -> None:
        """The runtime's compute goes with the reply to the keeper, which times the step (node_step_*)."""
        if self.kept is not None:
            self.kept.compute_us += compute_us

    async def _rebuild(self, timeout: float, position: int, step: list, step_id: str) -> Optional[RawTensor]:
        """A prefill of the session's history gives the new runtime's cache what the old one held. Where it
        can, the step goes in the same prefill (`step`: its tensors at `position`), and its output is
        returned: one pass over the weights fewer than a rebuild then a step (None: run the step next)."""
        if self.history.length == 0:
            return None
        hidden, prompts = None, None
        if rq.optional_tensor(step[1]) is None and rq.optional_tensor(step[2]) is None:
            hidden = self.history.replay_with(position, step[0])  # no deep prompts, no reordering in the step
        fused = hidden is not None
        if not fused:
            step_id = ""
            try:
                hidden, prompts = self.history.replay()
            except HistoryLost as e:
                raise RuntimeError(f"{NOT_REBUILT}: {e}") from None
        empty_prompts = RawTensor(hidden.dtype, (0,), b"")
        tensors = [hidden, prompts if prompts is not None else empty_prompts, RawTensor("int64", (0,), b"")]
        try:
            (output,) = await self.services.runtime.call(
                self._infer_step(0, tensors, step_id), tensors, timeout, self._spent
            )
        except RuntimeReplaced:
            raise
        except Exception as e:
            raise RuntimeError(f"{NOT_REBUILT}: {e}") from None
        if not fused:
            return None
        return last_positions(output, step[0].shape[1])
