"""A network frontend: the Petals RPCs, on requests the stream keeper (procs/keeper.py) relays.

Owns: an attachment to the node's p2pd (P2P.replicate, so the peer id is the node's: it registers no
  handler, and calls the next servers' rpc_push), a DEALER to the stream keeper, and the open inference
  sessions.
Receives: from the keeper, which holds every connection with the swarm: rpc_inference streams
  (StreamOpen, StreamIn, StreamInEnd) and the calls (UnaryCall: rpc_info, rpc_forward, rpc_backward,
  rpc_push, and rpc_forward_stream and rpc_backward_stream read whole; UnaryCancel: its caller left);
  replies from the runtime, the allocator and the announcer;
  PushDelivery for sessions it owns; control: Stop (a drain: new calls are refused, open sessions are
  served until they end or the grace does; a second Stop with no grace cuts it short), Retire (a reload:
  a new frontend serves, this one takes nothing new and ends when its streams do), PeerDown, PeerUp,
  Serve (the blocks served now).
Sends: KeeperHello (taking streams or not), StreamOut/StreamHandled/StreamKeep/StreamDone, UnaryReply to
  the keeper;
  Forward/Backward/InferStep/Cancel to the runtime; Allocate/Release/GrowHistory/Adopt/
  CapacityQuery/PushRoute to the allocator; ServingQuery to the announcer (before a push); replies and error frames
  to clients, pushes to the next servers of v2.2.0 clients' chains.
"""

from __future__ import annotations

from node import startup

startup.die_with_supervisor()
startup.light_hivemind()  # before the imports below: see node/startup.py

import asyncio
import functools
import os
import time
from typing import Optional

import zmq
import zmq.asyncio
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from node import host_memory
from node.frontend.errors import ShuttingDown
from node.frontend.kept import KeptStream
from node.frontend.rpcs import KEPT, NAME_PREFIX, Rpcs
from node.frontend.streams import stream_handler
from node.keeper.calls import STREAMED, UNARY  # held by the stream keeper, which relays each call to a frontend
from node.logs import quiet_hivemind
from procs import actor as actor_lib
from protocol.messages import (
    AllocatorReply,
    AnnouncerReply,
    FrontendReady,
    Granted,
    KeeperHello,
    KeeperToFrontend,
    PeerDown,
    PeerUp,
    PushDelivery,
    Release,
    Retire,
    RuntimeReply,
    Serve,
    Stop,
    StreamIn,
    StreamInEnd,
    StreamOpen,
    UnaryCall,
    UnaryCancel,
    UnaryReply,
)
from protocol.requester import Requester
from protocol.transport import AsyncChannel, BadMessage

LATE_GRANT_GRACE = 2.0  # seconds a grant nobody waited for may take to find its session (unsolicited)


class FrontendProcess:
    """Attaches the RPCs to p2pd and moves control messages and actor replies to them; decides nothing."""

    def __init__(self, actor: actor_lib.Actor):
        self.actor = actor
        self.plan = actor.plan
        self.log = actor.log
        self.control = actor.async_control()
        self.ctx = zmq.asyncio.Context.shadow(actor.ctx)
        self.runtime = Requester.to_actor(actor, self.ctx, "runtime", RuntimeReply, observed=True)
        self.allocator = Requester.to_actor(
            actor, self.ctx, "allocator", AllocatorReply, observed=True, on_unsolicited=self.unsolicited
        )
        self.announcer = Requester.to_actor(actor, self.ctx, "announcer", AnnouncerReply, observed=True)
        self.rpcs = Rpcs(self.plan, self.runtime, self.allocator, self.announcer, self.log, probe=actor.probe)
        self.p2p = None
        keeper = self.ctx.socket(zmq.DEALER)
        keeper.setsockopt(zmq.ROUTING_ID, actor.name.encode())
        keeper.setsockopt(zmq.LINGER, 1000)  # a session's last frames reach the keeper even as we exit
        keeper.connect(self.plan.endpoint("keeper.sock"))
        self.keeper = AsyncChannel(keeper, KeeperToFrontend, observer=actor.probe.observe)
        self.kept: dict[int, KeptStream] = {}  # the keeper's streams we serve, by its stream number
        self.kept_handler = None  # node/frontend/streams.py's handler of rpc_inference, for kept streams
        self.answering: dict[int, asyncio.Task] = {}  # the keeper's unary calls being answered, by number
        self.accepting, self.draining = True, False
        self.retiring = False  # a reload replaced us: the calls we give up are asked again of our successor
        # A forward's bytes are copied several times here (frames, protobuf, tensors): from fresh pages each
        # time, glibc's default for buffers above its mmap threshold, the page faults cost more than the
        # copies (a 4 MiB request: ~1 us per 4 KiB page, 3.7 ms against 0.8 for five copies; an 8b-shape
        # 4 x 128 forward cost this frontend 24 ms of CPU, 11 with the heap kept). Given back once idle.
        host_memory.hold_freed_memory()
        self.trimmer = host_memory.Trimmer()

    async def start(self) -> None:
        self.runtime.start()
        self.allocator.start()
        self.announcer.start()
        self.p2p = await P2P.replicate(Multiaddr(self.plan.daemon_maddr))
        self.rpcs.attached(self.p2p)
        # the keeper holds these streams' connections: they reach us through it (from_keeper)
        self.kept_handler = stream_handler(
            self.p2p,
            NAME_PREFIX + KEPT,
            self.rpcs.rpc_inference,
            self.log,
            sizes=functools.partial(self.rpcs.stream_sizes, KEPT),
            scopes=self.rpcs.scopes,
            refuse=self.rpcs.refuse,
        )
        self.hello()
        self.actor.ready(
            FrontendReady(
                peer_id=self.p2p.peer_id.to_base58(),
                stream_maddr=str(self.p2p._client_listen_maddr),
                stream_handlers=[],  # the keeper registers every handler: p2pd never dials us
            )
        )

    # --- receiving ---------------------------------------------------------------------------

    async def from_keeper(self) -> None:
        """The kept streams: a new one (or one handed over from a frontend that died), the client's
        frames, the end of its input."""
        while True:
            try:
                envelope = await self.keeper.recv()
            except BadMessage as e:
                self.log.warning("bad message from the stream keeper", reason=e.reason)
                continue
            try:
                self.keeper_message(envelope.msg, envelope.frames)
            except Exception as e:  # a bug with one message must not stop every stream this frontend serves
                self.log.error("a message of the stream keeper failed", msg=type(envelope.msg).__name__, exc_info=e)

    def keeper_message(self, msg, frames: list) -> None:
        if isinstance(msg, StreamOpen):
            self.open_kept(msg, frames)
        elif isinstance(msg, StreamIn):
            stream = self.kept.get(msg.stream)
            if stream is not None and frames:
                stream.feed(msg.marker, frames[0])
        elif isinstance(msg, StreamInEnd):
            stream = self.kept.get(msg.stream)
            if stream is not None:
                stream.feed_eof()
        elif isinstance(msg, UnaryCall):
            task = asyncio.get_running_loop().create_task(self.answer_call(msg, frames))
            self.answering[msg.call] = task  # the loop keeps only a weak reference
            task.add_done_callback(lambda _, call=msg.call: self.answering.pop(call, None))
        elif isinstance(msg, UnaryCancel):
            task = self.answering.get(msg.call)
            if task is not None:
                task.cancel()

    async def answer_call(self, msg: UnaryCall, frames: list) -> None:
        """A call the keeper holds: answered as hivemind would (its response, or the repr of what a unary RPC
        raised, parsing included; a stream's reply in parts, or the text of its error frame)."""
        stream = msg.rpc in STREAMED
        try:
            if msg.rpc not in UNARY and not stream:
                raise ValueError(f"no RPC named {msg.rpc!r}")
            context = P2PContext(
                handle_name=NAME_PREFIX + msg.rpc, local_id=self.p2p.peer_id, remote_id=PeerID.from_base58(msg.peer)
            )
            if stream:
                responses = await self.rpcs.streamed_call(msg.rpc, [frame.bytes for frame in frames], context)
                self.keeper.send(UnaryReply(msg.call), [response.SerializeToString() for response in responses])
                return
            if len(frames) != 1:
                raise ValueError(f"a unary call comes in one frame, not {len(frames)}")
            request_type = runtime_pb2.ExpertUID if msg.rpc == "rpc_info" else runtime_pb2.ExpertRequest
            response = await getattr(self.rpcs, msg.rpc)(request_type.FromString(frames[0].bytes), context)
            self.keeper.send(UnaryReply(msg.call), [response.SerializeToString()])
        except Exception as e:
            if self.retiring and isinstance(e, ShuttingDown):  # our --drain_timeout is over: our successor
                self.keeper.send(UnaryReply(msg.call, again=True), [])  # answers it, as if we had died
                return
            error = (str(e) or type(e).__name__) if stream else repr(e)
            self.keeper.send(UnaryReply(msg.call, error=error), [])

    def open_kept(self, msg: StreamOpen, frames: list) -> None:
        stream = KeptStream(msg.stream, msg.handled, lambda m, f: self.keeper.send(m, f), bool(msg.markers))
        for marker, frame in zip(msg.markers, frames):
            stream.feed(marker, frame)
        self.kept[msg.stream] = stream
        info = StreamInfo(peer_id=PeerID.from_base58(msg.peer), addr=None, proto=NAME_PREFIX + KEPT)
        task = asyncio.get_running_loop().create_task(self.kept_handler(info, stream.reader, stream, kept=stream))
        task.add_done_callback(lambda _: self._kept_ended(stream))

    def _kept_ended(self, stream: KeptStream) -> None:
        stream.close()  # the handler closed it already, unless it failed
        if self.kept.get(stream.stream) is stream:  # not a new keeper's stream of the same number
            del self.kept[stream.stream]

    def hello(self) -> None:
        self.keeper.send(KeeperHello(self.actor.name, os.getpid(), self.accepting, self.draining))

    def unsolicited(self, envelope) -> None:
        msg = envelope.msg
        if isinstance(msg, PushDelivery) and len(envelope.frames) == 1:
            self.rpcs.deliver_push(msg.session, envelope.frames[0].bytes)
        elif isinstance(msg, Granted) and not self.rpcs.sessions.hold(msg.handle):
            # granted to a session that stopped waiting (its client left, or its wait timed out): the cache
            # and the session's slots would stay held until the lease lapsed. Not at once: a session whose
            # request was failed over to a new allocator asked again, and gets this same grant in a moment
            loop = asyncio.get_running_loop()
            loop.call_later(LATE_GRANT_GRACE, self.release_unheld, msg.handle)

    def release_unheld(self, handle: int) -> None:
        if not self.rpcs.sessions.hold(handle):
            self.allocator.send(Release(handle))
            self.log.info("late grant released", handle=handle)

    async def serve(self) -> None:
        """Until our drain (a stop, or a retirement after a reload) is over; control messages are handled
        meanwhile: the actors behind the sessions being drained may be replaced too."""
        relaying = asyncio.get_running_loop().create_task(self.from_keeper())
        try:
            await self._serve()
        finally:
            relaying.cancel()

    async def _serve(self) -> None:
        draining: Optional[asyncio.Task] = None
        while draining is None or not draining.done():
            try:
                msg = await asyncio.wait_for(self.control.get(), timeout=0.2 if draining else 1.0)
            except asyncio.TimeoutError:
                msg = None
            if isinstance(msg, Stop):
                if draining is None:
                    draining = asyncio.get_running_loop().create_task(self.drain(msg.grace))
                elif msg.grace <= 0:
                    self.log.info("stop at once: the drain is cut short", sessions=len(self.rpcs.sessions))
                    self.rpcs.cut()
            elif isinstance(msg, Retire) and draining is None:
                draining = asyncio.get_running_loop().create_task(self.retire(msg))
            elif isinstance(msg, PeerDown):
                self.peer_down(msg.name)
            elif isinstance(msg, PeerUp):
                self.peer_up(msg.name)
            elif isinstance(msg, Serve):  # the blocks were chosen, or the node moved
                self.plan.start_block, self.plan.end_block = msg.start_block, msg.end_block
                self.rpcs.scopes.follow(self.plan)
            self.actor.stats = self.rpcs.stats()
            self.actor.publish_stats()
            latency = self.rpcs.counters.latency.values()
            self.trimmer.tick(bool(self.rpcs.calls), sum(h.count for h in latency))
        await draining

    def peer_down(self, name: str) -> None:
        """An actor died: what waits on it fails over to its replacement (node/frontend/runtime_link.py)."""
        if name.startswith("runtime"):
            self.log.info("runtime died: its work is sent again to its replacement", waiting=self.runtime.in_flight)
            self.rpcs.runtime.down()
        elif name == "allocator":
            self.allocator.down("the cache allocator restarted")
        elif name == "announcer":
            self.announcer.down("the announcer restarted")
        elif name == "keeper":  # the streams it held died with it (as with p2pd): their sessions end
            for stream in self.kept.values():
                stream.detach()  # its replacement numbers its streams afresh: nothing of these may reach it
                stream.feed_eof()
            self.kept.clear()

    def peer_up(self, name: str) -> None:
        if name == "runtime.0":  # the leader is ready only once its whole group is
            self.runtime.up()
        elif name == "allocator":
            self.readopt()
            self.allocator.up()
        elif name == "announcer":
            self.announcer.up()
        elif name == "keeper":
            self.hello()

    def readopt(self) -> None:
        """A new allocator knows nothing: tell it the grants our open sessions still hold."""
        for adopt in self.rpcs.sessions.adopt_messages():
            self.allocator.send(adopt)

    async def retire(self, msg: Retire) -> None:
        """A reload: our replacement already serves. Calls and streams that start from now on go to it (the
        keeper gives us none); ours go on until they end, or until msg.timeout (--drain_timeout): then the
        inference sessions still open are handed to another frontend by the keeper as we exit, and the
        other calls are given back to the keeper, which asks our successor (answer_call)."""
        began = time.monotonic()
        self.accepting, self.retiring = False, True
        self.hello()  # the keeper gives us no new calls nor streams
        self.log.info("retiring", sessions=len(self.rpcs.sessions), in_flight=self.rpcs.in_flight)
        cut = await self.rpcs.drain(msg.timeout, refuse=False, hand_over=True)
        for stream in self.kept.values():  # what our exit would write to them (their end) must not leave
            stream.detach()
        self.log.info(
            "retired",
            seconds=round(time.monotonic() - began, 2),
            calls_handed_over=cut,
            sessions_handed_over=len(self.kept),
        )

    async def drain(self, grace: float) -> None:
        began = time.monotonic()
        self.accepting, self.draining = False, True
        self.hello()
        cut = await self.rpcs.drain(grace)  # it logs what it waits for, from its first moment
        self.log.info("drained", seconds=round(time.monotonic() - began, 2), calls_cut=cut)

    def close(self) -> None:
        self.keeper.close()
        self.runtime.close()
        self.allocator.close()
        self.announcer.close()


async def amain(actor: actor_lib.Actor) -> None:
    quiet_hivemind()
    frontend = FrontendProcess(actor)
    try:
        await frontend.start()
        await frontend.serve()
    finally:
        frontend.close()


def main(actor: actor_lib.Actor) -> None:
    asyncio.run(amain(actor))


if __name__ == "__main__":
    actor_lib.run(main)
