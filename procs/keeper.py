"""The stream keeper: holds every rpc_inference stream's connection to p2pd, every forward and backward
stream and every unary call, so that a frontend's crash does not end the sessions it served, nor leave a
call it held unanswered (docs/reliability.md, "A frontend's crash").

p2pd binds a stream for life to the process that accepted its connection: when that process dies, the
stream dies. So the process that accepts inference streams is not the one that runs sessions: this one
only reads and writes hivemind's frames (PROTOCOL 1.2), within bounds, and relays them to a frontend;
node/keeper/table.py decides which frontend, what is logged, and who takes a stream over. p2pd leaves a
unary call waiting for good when the process that took it dies, so the unary RPCs are registered here
too, and node/keeper/calls.py relays each call to a frontend, and to another if that one dies. A forward
or backward stream is one request in parts: it is read whole here (node/keeper/streamed.py) and relayed
as a call the same way.
Owns: an attachment to the node's p2pd (P2P.replicate: the node's peer id), the registrations of
  rpc_inference, rpc_forward_stream, rpc_backward_stream and of the unary RPCs, every stream's connection,
  every call until it is answered, and the ROUTER `keeper.sock` to the frontends.
Receives: streams and unary calls from p2pd; from frontends (ROUTER): KeeperHello, StreamOut,
  StreamHandled, StreamKeep, StreamDone, UnaryReply; control: PeerDown(frontend.N) (its streams are
  handed over, its calls sent again), Serve (the blocks served now, which bound a message's size), Stop.
Sends: StreamOpen, StreamIn, StreamInEnd, UnaryCall, UnaryCancel to frontends; the frontends' frames to the streams'
  clients, their answers to the calls' callers.
"""

from __future__ import annotations

from node import startup

startup.die_with_supervisor()
startup.light_hivemind()  # before the imports below: see node/startup.py

import asyncio
import collections
import functools
import time
from typing import Optional

import zmq
import zmq.asyncio
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

from node import host_memory
from node.frontend import backlog
from node.frontend.errors import ShuttingDown
from node.frontend.limits import Refused, RequestSizes, Scopes
from node.frontend.streams import FRAME_OVERHEAD, drain_input
from node.frontend.time_limit import within
from node.keeper import streamed
from node.keeper.calls import STREAMED, UNARY, Call, Calls
from node.keeper.table import Close, Keeper, Stream, Write
from node.logs import quiet_hivemind
from procs import actor as actor_lib
from protocol import stream_framing as framing
from protocol.messages import (
    SHUTTING_DOWN,
    KeeperHello,
    KeeperInbox,
    KeeperReady,
    KeeperStats,
    PeerDown,
    Serve,
    Stop,
    UnaryReply,
)
from protocol.transport import BadMessage

NAME_PREFIX = "TransformerConnectionHandler."
HANDLER = NAME_PREFIX + "rpc_inference"
FRAME_SECONDS = 10.0  # a frame's payload must arrive within this, plus a second per MiB
MIN_RATE = 1 << 20
INPUT_DRAIN_SECONDS = 1.0  # after the last frame, how long the client's remaining input is read and dropped
WRITE_BUFFER = 1 << 20  # bytes written to a stream and not yet taken by p2pd, past which writes wait
WAIT_FOR_FRONTEND = 60.0  # how long a stream or a call waits for a frontend (a replacement starts in seconds)
CALL_SLACK = 30.0  # past --request_timeout (which the frontend enforces), how long a call's answer may take


class Raw:
    """A unary call's request and response as bytes: hivemind's protobuf handler without the parsing (a
    frontend parses the request, and its errors reach the caller as they would from the frontend)."""

    def __init__(self, data: bytes):
        self.data = data

    @staticmethod
    def FromString(data: bytes) -> bytes:  # noqa: N802 (protobuf's name)
        return data

    def SerializeToString(self) -> bytes:  # noqa: N802
        return self.data


class Relayed(Exception):
    """A frontend's error for a call: its repr is the frontend's repr of what the RPC raised, which p2pd
    gives the caller as the call's error (hivemind sends repr(e)), so the caller reads the same text."""

    def __repr__(self) -> str:
        return str(self.args[0])


class Connection:
    """One stream's p2pd connection: what is to be written to it, and when more may be read."""

    def __init__(self, stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.stream, self.reader, self.writer = stream, reader, writer
        self.actions: asyncio.Queue = asyncio.Queue()  # Write, then a Close
        self.readable = asyncio.Event()  # set whenever the window may have opened
        self.reserved: collections.deque[int] = collections.deque()  # bytes of each message not yet handled
        self.released = 0  # messages whose bytes went back to the scopes
        self.errored = False  # the last frame written was an error: the client closes first (drain_input)
        self.unwritten = 0  # frames given to `actions` that `_write` has not yet seen taken by the client

    def unbuffered(self) -> bool:
        """Whether a frame may be written at once: the client reads what was written before (what waits
        beyond WRITE_BUFFER goes through `actions`, whose writer waits for the client)."""
        transport = self.writer.transport
        return not transport.is_closing() and transport.get_write_buffer_size() < WRITE_BUFFER

    def writable(self) -> bool:
        """Whether the client takes its replies: no frame waits in `actions` or is being drained by `_write`
        (each in a bounded time). Its next message is read only then, so that a client that sends and never
        reads cannot make the keeper hold its replies. Not the transport's buffer: a frame written at once
        may leave it above WRITE_BUFFER, and nothing would wake the reader when it empties."""
        return self.unwritten == 0


class StepTimes:
    """Inference steps from their message read to their reply written, against the runtime's compute in
    them: what the node adds to a step beyond its blocks' compute (KeeperStats, node_step_*)."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.compute_seconds = 0.0

    def add(self, seconds: float, compute_seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.compute_seconds += compute_seconds


class KeeperProcess:
    """Moves bytes between p2pd's streams and the frontends; the table decides."""

    def __init__(self, actor: actor_lib.Actor):
        self.actor = actor
        self.plan = actor.plan
        self.log = actor.log
        self.control = actor.async_control()
        ctx = zmq.asyncio.Context.shadow(actor.ctx)
        self.inbox = actor.bind_inbox(ctx, "keeper", KeeperInbox)
        self.table = Keeper(self.send, self.log)
        self.calls = Calls(self.send, lambda: self.table.frontends, self.log, first_id=time.time_ns())
        self.answers: dict[int, asyncio.Future] = {}  # each open call's caller waits on its own
        self.connections: dict[int, Connection] = {}
        self.streamed: set[asyncio.Task] = set()  # the forward and backward streams being served
        self.stopping: Optional[asyncio.Future] = None  # done once the keeper stops: requests still arriving end
        self.refused: dict[str, int] = {}  # messages refused by a limit, per reason (node_refused_total)
        self.steps = StepTimes()
        self.p2p: Optional[P2P] = None
        # what strangers may make the keeper hold: a message's bytes are reserved before it is read and
        # given back once a frontend has handled it (what stays in a log is bounded by its budget)
        self.scopes = Scopes.of(self.plan)
        # what large requests free stays in the heap for the next ones (page faults cost more than the
        # copies: node/host_memory.py, procs/frontend.py), and goes back once the keeper is idle
        host_memory.hold_freed_memory()
        self.trimmer = host_memory.Trimmer()
        self.calls_ended = 0
        self.requests_cut = 0  # forward or backward requests still arriving when the keeper stopped

    def send(self, frontend: str, msg, frames: list) -> None:
        try:
            self.inbox.send(msg, frames, to=frontend.encode())
        except zmq.ZMQError as e:  # gone: its PeerDown hands its streams over
            self.log.info("frontend unreachable", frontend=frontend, error=repr(e))

    def release(self, connection: Connection, everything: bool = False) -> None:
        """The bytes of the messages a frontend has handled (or all, when the stream ends) go back."""
        while connection.reserved and (everything or connection.released < connection.stream.handled):
            self.scopes.release(connection.stream.peer, connection.reserved.popleft())
            connection.released += 1

    async def start(self) -> None:
        self.stopping = asyncio.get_running_loop().create_future()
        self.p2p = await P2P.replicate(Multiaddr(self.plan.daemon_maddr))
        await self.p2p.add_binary_stream_handler(HANDLER, self.handle, balanced=True)
        for rpc in STREAMED:
            handler = functools.partial(self.forward_or_backward, rpc)
            await self.p2p.add_binary_stream_handler(NAME_PREFIX + rpc, handler, balanced=True)
        for rpc in UNARY:
            handler = functools.partial(self.unary, rpc)
            await self.p2p.add_protobuf_handler(NAME_PREFIX + rpc, handler, Raw, balanced=True)
        self.log.info("stream backlog", backlog=backlog.widen(backlog.listen_path(self.p2p)))
        self.actor.ready(
            KeeperReady(
                peer_id=self.p2p.peer_id.to_base58(),
                stream_maddr=str(self.p2p._client_listen_maddr),
                # p2pd forgets the unary ones with our connection
                stream_handlers=[HANDLER, *(NAME_PREFIX + rpc for rpc in STREAMED)],
            )
        )

    # --- receiving: streams from p2pd ----------------------------------------------------------

    async def handle(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(stream_info.peer_id)
        if await self.refused_now(reader, writer):
            return
        stream = self.table.open(peer, time.monotonic())
        connection = self.connections[stream.id] = Connection(stream, reader, writer)
        reading = asyncio.get_running_loop().create_task(self._read(connection))
        reading.add_done_callback(lambda task: self._reading_ended(task, connection))
        try:
            await self._write(connection)
        except (ConnectionError, OSError) as e:
            self.log.info("stream ended: its client is gone", stream=stream.id, peer=peer, error=repr(e))
            if not stream.done:
                self.table.input_cut(stream)
        finally:
            stream.done = True
            connection.readable.set()
            await self._finish(connection, reading)
            self.release(connection, everything=True)
            self.table.gone(stream)
            self.connections.pop(stream.id, None)

    async def refused_now(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """A new stream while every frontend drains (the node stops) gets the reason, and nothing is read."""
        refusal = self.table.refusal()
        if refusal is None:
            return False
        framing.write_error(writer, refusal)
        try:
            await writer.drain()
            await drain_input(reader, None, until_closed=True)  # see drain_input: closing first may lose it
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
        return True

    def _reading_ended(self, task: asyncio.Task, connection: Connection) -> None:
        """A bug in reading must end the stream with an error, not leave its client waiting."""
        if not task.cancelled() and task.exception() is not None:
            self.log.error("stream reader failed", stream=connection.stream.id, exc_info=task.exception())
            if not connection.stream.done:
                connection.stream.done = True
                connection.actions.put_nowait(Close(f"the server failed to read this stream: {task.exception()!r}"))

    async def _read(self, connection: Connection) -> None:
        """The client's frames, in order, within the window and the size bound; once the stream is done,
        what is left is read and dropped so that closing the stream does not reset it."""
        stream, reader = connection.stream, connection.reader
        while True:
            while not (self.table.may_read(stream) and connection.writable()) and not stream.done:
                connection.readable.clear()
                await connection.readable.wait()
            if stream.input_ended:
                return
            try:
                marker, length = await framing.read_header(reader)
                limit = RequestSizes.of(self.plan).step
                if length > limit:
                    raise ValueError(f"a stream message of {length} bytes exceeds the limit of {limit}")
                if not stream.done:
                    await self.scopes.reserve(stream.peer, length + FRAME_OVERHEAD)
                    connection.reserved.append(length + FRAME_OVERHEAD)
                payload = await within(reader.readexactly(length), FRAME_SECONDS + length / MIN_RATE)
            except (asyncio.IncompleteReadError, ConnectionError):
                if not stream.done:
                    self.table.input_cut(stream)
                    connection.actions.put_nowait(Close())
                return
            except (asyncio.TimeoutError, ValueError, Refused) as e:
                reason = str(e) or f"a stream message did not arrive within {FRAME_SECONDS:.0f} s"
                kind = (
                    e.reason
                    if isinstance(e, Refused)
                    else "message_size"
                    if isinstance(e, ValueError)
                    else "slow_sender"
                )
                self.refuse(kind, stream.peer, reason, stream=stream.id)
                if not stream.done:
                    self.table.input_cut(stream)
                    stream.done = True
                    connection.actions.put_nowait(Close(reason))
                if not isinstance(e, Refused):
                    return
                try:  # the refused message is within the size limit: dropped, so that the rest can be too
                    await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                continue
            if stream.done:
                if marker != framing.MESSAGE:
                    return
                continue
            ended = self.table.received(stream, marker[0], payload, time.perf_counter())
            if ended is not None:
                connection.actions.put_nowait(ended)
            if self.actor.probe.active:  # for `node.probe --follow`: when a client's step reached the node
                fields = {"stream": stream.id, "message": stream.received}
                self.actor.probe.publish("in", "ClientMessage", fields=fields)

    async def _write(self, connection: Connection) -> None:
        """What waits for the client (frames beyond WRITE_BUFFER, a Close): each frame must be taken in the
        time a frame of its size has to arrive, or the client, which does not read, is treated as gone."""
        writer = connection.writer
        while True:
            action = await connection.actions.get()
            if isinstance(action, Write):
                self.write(connection, action)
                await self._drained(connection, len(action.payload))
                connection.unwritten -= 1
                connection.readable.set()  # its next message may be read now (Connection.writable)
            elif isinstance(action, Close):
                if action.error is not None:
                    framing.write_error(writer, action.error)
                    await self._drained(connection, len(action.error))
                    connection.errored = True
                return

    async def _drained(self, connection: Connection, nbytes: int) -> None:
        if not await streamed.written(connection.writer, nbytes):
            stream = connection.stream
            self.refuse("slow_reader", stream.peer, "the client did not read its replies", stream=stream.id)
            raise ConnectionError(f"the client did not take a frame of {nbytes} bytes in time")

    async def _finish(self, connection: Connection, reading: asyncio.Task) -> None:
        """Give the client's remaining input a moment to end before the stream closes (see _read), and
        after an error frame, the client a moment to close first (see drain_input)."""
        try:
            await asyncio.wait_for(reading, INPUT_DRAIN_SECONDS)
            if connection.errored:
                await drain_input(connection.reader, None, until_closed=True)
        except Exception:  # a timeout, or the reader's failure (logged by _reading_ended)
            pass
        finally:
            connection.writer.close()

    # --- receiving: unary calls from p2pd ------------------------------------------------------

    async def unary(self, rpc: str, request: bytes, context) -> Raw:
        """One unary call, answered by a frontend (another, if that one dies); its bytes are reserved for its
        peer and for the keeper while it is held, as a frontend does."""
        peer = str(context.remote_id)
        try:
            await self.scopes.reserve(peer, len(request))
        except Refused as e:
            self.refuse(e.reason, peer, str(e), rpc=rpc)
            raise
        try:
            return Raw(b"".join(await self.held(rpc, peer, [request])))
        finally:
            self.scopes.release(peer, len(request))

    async def held(self, rpc: str, peer: str, frames: list[bytes]) -> list[bytes]:
        """A call's answer from a frontend (another, if that one dies): its messages, or the error raised
        (Relayed: the text the caller is to get)."""
        answer = asyncio.get_running_loop().create_future()
        call = self.calls.start(rpc, peer, frames, time.monotonic())
        self.answers[call.id] = answer
        try:
            limit = self.plan.request_timeout + CALL_SLACK
            try:
                return await within(answer, limit)
            except asyncio.TimeoutError:
                raise TimeoutError(f"{rpc} was not answered within {limit:.0f} s") from None
        finally:
            self.answers.pop(call.id, None)
            self.calls.forget(call)
            self.calls_ended += 1

    def refuse(self, reason: str, peer: str, detail: str, **fields) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.log.info("refused", reason=reason, peer=peer, detail=detail, **fields)

    # --- receiving: forward and backward streams from p2pd ------------------------------------

    async def forward_or_backward(self, rpc: str, stream_info, reader, writer) -> None:
        """rpc_forward_stream or rpc_backward_stream: read whole, then held as a call (node/keeper/streamed.py)."""
        peer = str(stream_info.peer_id)
        if await self.refused_now(reader, writer):
            return
        task = asyncio.current_task()
        self.streamed.add(task)
        try:
            message, total = RequestSizes.of(self.plan).stream(rpc)
            cut = await streamed.serve(
                rpc,
                peer,
                reader,
                writer,
                limits=streamed.Limits(message, total, self.plan.request_timeout),
                scopes=self.scopes,
                ask=functools.partial(self.held, rpc, peer),
                refuse=functools.partial(self.refuse, rpc=rpc),
                stopping=self.stopping,
                log=self.log,
            )
            self.requests_cut += cut
        finally:
            self.streamed.discard(task)

    def answer(self, calls: list[Call]) -> None:
        for call in calls:
            future = self.answers.get(call.id)
            if future is None or future.done():
                continue
            if call.error is not None:
                future.set_exception(Relayed(call.error))
            else:
                future.set_result(call.response)

    def frontend_down(self, name: str, now: float, pid: int = 0) -> None:
        """Its streams are handed over and its calls sent again; news of a process whose replacement said
        hello already is stale (what it held went to the replacement then)."""
        known = self.table.frontends.get(name)
        if pid and known is not None and known.pid != pid:
            return
        self.end(self.table.down(name, now, pid))
        self.calls.down(name, now)

    def hello(self, msg: KeeperHello, now: float) -> None:
        known = self.table.frontends.get(msg.frontend)
        self.end(self.table.hello(msg, now))  # a new pid under a known name: what the old one held goes first
        if known is not None and known.pid != msg.pid:
            self.calls.down(msg.frontend, now)
        self.calls.assign_waiting()

    # --- receiving: frontends ----------------------------------------------------------------

    async def relay(self) -> None:
        while True:
            try:
                envelope = await self.inbox.recv()
            except BadMessage as e:
                self.log.warning("bad message from a frontend", reason=e.reason)
                continue
            try:
                self.from_frontend(envelope.sender.decode(errors="replace"), envelope.msg, envelope.frames)
            except Exception as e:  # a bug with one message must not stop every stream and call the keeper holds
                self.log.error("a frontend's message failed", msg=type(envelope.msg).__name__, exc_info=e)

    def from_frontend(self, sender: str, msg, frames: list) -> None:
        if isinstance(msg, KeeperHello):
            self.hello(msg, time.monotonic())
            return
        if isinstance(msg, UnaryReply):
            call = self.calls.reply(sender, msg, frames, time.monotonic())
            if call is not None:
                self.answer([call])
            return
        stream, action = self.table.from_frontend(sender, msg, frames)
        if stream is None:
            return
        connection = self.connections.get(stream.id)
        if connection is None:
            return
        self.release(connection)
        if isinstance(action, Write) and connection.actions.empty() and connection.unbuffered():
            self.write(connection, action)  # at once: no task switch
        elif action is not None:
            connection.unwritten += isinstance(action, Write)
            connection.actions.put_nowait(action)
        connection.readable.set()

    def write(self, connection: Connection, action: Write) -> None:
        framing.write_frame(connection.writer, bytes([action.marker]), action.payload)
        connection.errored = action.marker == framing.ERROR[0]
        if action.since:
            self.steps.add(time.perf_counter() - action.since, action.compute_us / 1e6)
        if self.actor.probe.active:  # for `node.probe --follow`: when a reply left the node
            fields = {"stream": connection.stream.id, "handled": action.handled, "marker": action.marker}
            self.actor.probe.publish("out", "ClientFrame", fields=fields)

    def end(self, ended: dict[int, Close]) -> None:
        for stream_id, close in ended.items():
            connection = self.connections.get(stream_id)
            if connection is not None:
                connection.actions.put_nowait(close)
                connection.readable.set()

    # --- control -----------------------------------------------------------------------------

    async def serve(self) -> None:
        relaying = asyncio.get_running_loop().create_task(self.relay())
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(self.control.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    msg = None
                now = time.monotonic()
                if isinstance(msg, Stop):
                    break
                if isinstance(msg, PeerDown) and msg.name.startswith("frontend"):
                    self.frontend_down(msg.name, now, msg.pid)
                elif isinstance(msg, Serve):
                    self.plan.start_block, self.plan.end_block = msg.start_block, msg.end_block
                    self.scopes.follow(self.plan)
                self.end(self.table.overdue(now, WAIT_FOR_FRONTEND))
                self.answer(self.calls.overdue(now, WAIT_FOR_FRONTEND))
                streams, kept, log_bytes = self.table.counts()
                self.actor.stats = KeeperStats(
                    streams=streams,
                    kept=kept,
                    log_bytes=log_bytes,
                    resumed=self.table.resumed,
                    calls=self.calls.count(),
                    calls_resent=self.calls.resent,
                    refused=dict(self.refused),
                    bytes_in_flight=self.scopes.used,
                    steps_timed=self.steps.count,
                    step_seconds=self.steps.seconds,
                    step_compute_seconds=self.steps.compute_seconds,
                )
                self.actor.publish_stats()
                busy = bool(self.calls.count() or self.streamed)
                self.trimmer.tick(busy, self.calls_ended + self.steps.count + self.table.received_total)
        finally:
            relaying.cancel()
        await self.stop()

    async def stop(self) -> None:
        """The frontends are gone (the supervisor stops us after them): what is still open ends now."""
        calls_cut = self.calls.end_all(repr(ShuttingDown(SHUTTING_DOWN)), SHUTTING_DOWN)
        self.answer(calls_cut)
        self.stopping.set_result(None)
        self.end({stream_id: Close(SHUTTING_DOWN) for stream_id in self.connections})
        for connection in list(self.connections.values()):
            connection.stream.done = True
        streams_cut = len(self.connections)
        deadline = time.monotonic() + 2.0
        while (self.connections or self.streamed) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.log.info("stopped", streams_cut=streams_cut, calls_cut=len(calls_cut) + self.requests_cut)


async def amain(actor: actor_lib.Actor) -> None:
    quiet_hivemind()
    keeper = KeeperProcess(actor)
    try:
        await keeper.start()
        await keeper.serve()
    finally:
        keeper.inbox.close(0)


def main(actor: actor_lib.Actor) -> None:
    asyncio.run(amain(actor))


if __name__ == "__main__":
    actor_lib.run(main)
