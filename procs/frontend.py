"""A network frontend: the Petals RPC handlers, registered on the supervisor's p2pd daemon.

Owns: an attachment to the node's p2pd (P2P.replicate, so the peer id is the node's), the handler
  registrations (balanced: p2pd spreads calls over all frontends), and the open inference sessions.
Receives: Petals RPCs from the swarm; replies from the runtime and the allocator; PushDelivery for
  sessions it owns; control: Stop, PeerDown, PeerUp, Serve (the blocks served now).
Sends: Forward/Backward/InferStep/Cancel to the runtime; Allocate/Release/Adopt/CapacityQuery/
  PushRoute to the allocator; replies and error frames to clients.
"""

from __future__ import annotations

from node import startup

startup.die_with_supervisor()
startup.light_hivemind()  # before the imports below: see node/startup.py

import asyncio
import time
from typing import Optional

import zmq
import zmq.asyncio
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from node.frontend.handlers import NAME_PREFIX, STREAMS, UNARY, Handlers, ShuttingDown
from node.logs import quiet_hivemind
from procs import actor as actor_lib
from procs.requester import Requester
from protocol import streams
from protocol.messages import AllocatorReply, FrontendReady, PeerDown, PeerUp, PushDelivery, RuntimeReply, Serve, Stop

PREFETCH = 5  # like hivemind: at most this many unread requests buffered per stream
INPUT_DRAIN_SECONDS = 1.0  # after our last frame, how long to wait for the rest of the client's input


def stream_handler(p2p: P2P, name: str, handler, log):
    """Serve one stream RPC with hivemind's framing, but answer malformed input with an error frame."""

    async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
        inbox: asyncio.Queue = asyncio.Queue(PREFETCH)

        async def requests():
            while True:
                item = await inbox.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item

        async def process() -> None:
            try:
                async for response in handler(requests(), context):
                    streams.write_message(writer, response)
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the client is gone; nobody to tell
            except Exception as e:
                streams.write_error(writer, str(e) or type(e).__name__)
                await writer.drain()

        task = asyncio.get_running_loop().create_task(process())
        receiving = True
        ended = False  # the client sent its end-of-input, closed, or sent what cannot be read any further
        receive = None
        try:
            while not task.done():
                if not receiving:
                    await task
                    break
                receive = asyncio.get_running_loop().create_task(streams.read_frame(reader))
                await asyncio.wait({task, receive}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    break  # `receive` stays pending for drain_input
                received, receive = receive, None
                try:
                    marker, payload = received.result()
                except (asyncio.IncompleteReadError, ConnectionError):
                    ended = True
                    task.cancel()  # the client closed or died mid-call: stop its work, free its cache
                    break
                except streams.FrameTooLarge as e:
                    await inbox.put(ValueError(str(e)))
                    receiving = False
                    continue
                if marker == streams.MESSAGE:
                    request = runtime_pb2.ExpertRequest()
                    try:
                        request.ParseFromString(payload)
                    except Exception:
                        await inbox.put(
                            ValueError(f"malformed ExpertRequest ({len(payload)} bytes could not be parsed)")
                        )
                        receiving = False
                        continue
                    await inbox.put(request)
                elif marker == streams.ERROR:
                    text = streams.error_text(payload)
                    await inbox.put(None if text is None else ConnectionError(f"the client sent an error: {text}"))
                    ended = True
                else:
                    await inbox.put(ValueError(f"malformed stream frame (marker {marker!r})"))
                    receiving = False
            if receiving and not ended and task.done() and not task.cancelled():
                await drain_input(reader, receive)
                receive = None
        except Exception:
            log.warning("stream handler failed", rpc=name, exc_info=True)
            task.cancel()
        finally:
            if receive is not None:
                receive.cancel()
            writer.close()

    return handle


async def drain_input(reader: asyncio.StreamReader, receive: Optional[asyncio.Task]) -> None:
    """Our reply is complete (often an early error) but the client may still be sending: read and drop its
    frames up to its end-of-input, for at most INPUT_DRAIN_SECONDS. Closing the stream with input still
    unread makes it a reset, and the client may then lose our last frames (the error message)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + INPUT_DRAIN_SECONDS
    try:
        while True:
            receive = receive or loop.create_task(streams.read_frame(reader))
            marker, _ = await asyncio.wait_for(receive, max(0.0, deadline - loop.time()))
            receive = None
            if marker != streams.MESSAGE:
                return  # end-of-input (or an error or a bad frame: nothing more to read)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
        return
    finally:
        if receive is not None:
            receive.cancel()


class Frontend:
    def __init__(self, actor: actor_lib.Actor):
        self.actor = actor
        self.plan = actor.plan
        self.log = actor.log
        self.control = actor.async_control()
        self.ctx = zmq.asyncio.Context.shadow(actor.ctx)
        observe = actor.probe.observe
        self.runtime = Requester(
            self.ctx, self.plan.endpoint("runtime.sock"), actor.name, RuntimeReply, observer=observe, log=self.log
        )
        self.allocator = Requester(
            self.ctx,
            self.plan.endpoint("allocator.sock"),
            actor.name,
            AllocatorReply,
            observer=observe,
            on_unsolicited=self.unsolicited,
            log=self.log,
        )
        self.handlers = Handlers(self.plan, self.runtime, self.allocator, self.log)
        self.handlers.probe = actor.probe
        self.p2p = None

    async def start(self) -> None:
        self.runtime.start()
        self.allocator.start()
        self.p2p = await P2P.replicate(Multiaddr(self.plan.daemon_maddr))
        self.handlers.p2p = self.p2p
        for name in UNARY:
            request_type = runtime_pb2.ExpertUID if name == "rpc_info" else runtime_pb2.ExpertRequest
            await self.p2p.add_protobuf_handler(
                NAME_PREFIX + name, getattr(self.handlers, name), request_type, balanced=True
            )
        for name in STREAMS:
            handler = stream_handler(self.p2p, NAME_PREFIX + name, getattr(self.handlers, name), self.log)
            await self.p2p.add_binary_stream_handler(NAME_PREFIX + name, handler, balanced=True)
        # if we die, the supervisor unregisters our stream handlers (p2pd would go on dialing us)
        self.actor.ready(
            FrontendReady(
                peer_id=self.p2p.peer_id.to_base58(),
                stream_maddr=str(self.p2p._client_listen_maddr),
                stream_handlers=[NAME_PREFIX + name for name in STREAMS],
            )
        )

    # --- receiving ---------------------------------------------------------------------------

    def unsolicited(self, envelope) -> None:
        if isinstance(envelope.msg, PushDelivery) and len(envelope.frames) == 1:
            self.handlers.deliver_push(envelope.msg.session, envelope.frames[0].bytes)

    async def serve(self) -> None:
        while True:
            try:
                msg = await asyncio.wait_for(self.control.get(), timeout=1.0)
            except asyncio.TimeoutError:
                msg = None
            if isinstance(msg, Stop):
                await self.drain(msg.grace)
                return
            if isinstance(msg, PeerDown):
                self.peer_down(msg.name)
            elif isinstance(msg, PeerUp) and msg.name == "allocator":
                self.readopt()
            elif isinstance(msg, Serve):  # the blocks were chosen, or the node moved
                self.plan.start_block, self.plan.end_block = msg.start_block, msg.end_block
            self.actor.stats = self.handlers.stats()
            self.actor.publish_stats()

    def peer_down(self, name: str) -> None:
        if name.startswith("runtime"):
            self.log.info("runtime died: failing requests waiting on it", waiting=self.runtime.in_flight)
            self.runtime.fail_all("the block runtime restarted")
        elif name == "allocator":
            self.allocator.fail_all("the cache allocator restarted")

    def readopt(self) -> None:
        """A new allocator knows nothing: tell it the grants our open sessions still hold."""
        for session in list(self.handlers.live):
            adopt = session.adopt_message()
            if adopt is not None:
                self.allocator.send(adopt)

    async def drain(self, grace: float) -> None:
        """Refuse new work, let running steps finish, end open sessions with a clear error."""
        self.handlers.draining = True
        for session in list(self.handlers.live):
            session.abort(ShuttingDown("the server is shutting down; retry on another server"))
        deadline = time.monotonic() + grace
        while self.handlers.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unfinished = self.handlers.in_flight
        if unfinished:
            # The grace period is over: fail what still waits so that its callers get an error reply
            # now. Work cut off by our exit gets no reply at all, and p2pd keeps its callers waiting.
            self.runtime.fail_all("the server is shutting down")
            self.allocator.fail_all("the server is shutting down")
            deadline = time.monotonic() + 1.0
            while self.handlers.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)  # the error replies leave through p2pd
        self.log.info("drained", unfinished=unfinished)

    def close(self) -> None:
        self.runtime.close()
        self.allocator.close()


async def amain(actor: actor_lib.Actor) -> None:
    quiet_hivemind()
    frontend = Frontend(actor)
    try:
        await frontend.start()
        await frontend.serve()
    finally:
        frontend.close()


def main(actor: actor_lib.Actor) -> None:
    asyncio.run(amain(actor))


if __name__ == "__main__":
    actor_lib.run(main)
