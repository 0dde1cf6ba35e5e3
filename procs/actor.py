"""What every actor process shares: the control plane, the probe socket and a graceful stop.

An actor is started as `python -m procs.<role> RUN_DIR NAME`. It owns:
- a control thread with a DEALER (identity NAME) to the supervisor's ROUTER: it sends Ready, Fatal and
  a Heartbeat with the actor's stats every second, and receives Stop and other control messages;
- an XPUB probe socket (used only by the actor's main thread) that publishes the headers of the
  messages the actor handles and its stats, but only while a probe is subscribed.
The role module supplies the main function and everything else.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import sys
import threading
import time
from typing import Callable, Optional

import msgspec
import zmq
import zmq.asyncio

from node import logs
from node.code_version import code_version
from protocol.messages import (
    ActorStats,
    ControlToActor,
    Fatal,
    Heartbeat,
    Message,
    ProbeEvent,
    Ready,
    ReadyDetail,
    Stop,
)
from protocol.plan import PLAN_FILE, NodePlan, read_plan
from protocol.transport import AsyncChannel, BadMessage, Channel


def wait_for_plan(run_dir: str) -> NodePlan:
    """Actors start while the supervisor still resolves the model; the plan appears when it is done."""
    path = os.path.join(run_dir, PLAN_FILE)
    while not os.path.exists(path):
        if os.getppid() == 1:  # orphaned before the plan came: nothing to serve
            os._exit(1)
        time.sleep(0.02)
    return read_plan(run_dir)


LOOK_PERIOD = 0.05  # seconds between looks for probes attaching or leaving


class Probe:
    """An XPUB socket that stays silent (and costs nothing) while nobody subscribes."""

    def __init__(self, ctx: zmq.Context, endpoint: str, actor: str):
        self.actor = actor
        self._sock = ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 10000)
        self._sock.bind(endpoint)
        self._topics: set[bytes] = set()
        self._next_look = 0.0
        self._encoder = msgspec.msgpack.Encoder()

    @property
    def active(self) -> bool:
        # Asked for every message the actor sends or receives; reading the XPUB socket each time (a failed
        # non-blocking recv raises) cost 2 to 5% of the frontend's and keeper's time per step. A probe
        # that attaches is seen within LOOK_PERIOD.
        now = time.monotonic()
        if now < self._next_look:
            return bool(self._topics)
        self._next_look = now + LOOK_PERIOD
        while True:
            try:
                sub = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if sub[:1] == b"\x01":
                self._topics.add(sub[1:])
            elif sub[:1] == b"\x00":
                self._topics.discard(sub[1:])
        return bool(self._topics)

    def publish(self, direction: str, type_: str, session: str = "", req: int = -1, fields: Optional[dict] = None):
        if not self.active:
            return
        event = ProbeEvent(self.actor, time.time(), direction, type_, session or "", req, fields or {})
        try:
            self._sock.send_multipart([type_.encode(), self._encoder.encode(event)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # a slow probe loses events rather than slowing the node

    def observe(self, direction: str, msg: Message, peer: Optional[bytes] = None) -> None:
        """Channel observer: publish a message header (tensor frames are summarized by their metadata).

        `peer` is the other end's identity on a ROUTER (who sent it, or to whom it goes), so that a
        probe can tell apart the request numbers of different frontends.
        """
        if not self.active:
            return
        fields = msgspec.structs.asdict(msg)
        if peer is not None:
            fields["peer_actor"] = peer.decode(errors="replace")
        self.publish(direction, type(msg).__name__, str(fields.get("session", "")), fields.get("req", -1), fields)

    def close(self) -> None:
        self._sock.close(0)


class Actor:
    """The parts of an actor process that do not depend on its role."""

    def __init__(self, name: str, run_dir: str):
        self.name = name
        self.code = code_version()  # before the plan: what this process imported is on disk now
        self.plan: NodePlan = wait_for_plan(run_dir)
        self.log = logs.setup(name, self.plan.log_level, self.plan.log_format)
        self.ctx = zmq.Context()
        # replaced whole by the main thread (never mutated), read by the control thread for heartbeats
        self.stats: Optional[ActorStats] = None
        self.stopping = threading.Event()
        self.grace = self.plan.shutdown_grace
        # control messages other than Stop go to this callback (from the control thread)
        self.on_control: Callable[[Message], None] = self._queue_control
        self.control_inbox: "queue.Queue[Message]" = queue.Queue()
        self.on_stop: Callable[[], None] = lambda: None
        self.probe = Probe(self.ctx, self.plan.endpoint(f"probe.{name}.sock"), name)
        self._outbox: "queue.Queue[Message]" = queue.Queue()
        self._control_thread = threading.Thread(target=self._control_loop, name="control", daemon=True)
        self._closed = False
        self._last_stats = 0.0
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop(self.plan.shutdown_grace))

    def bind_inbox(self, ctx: zmq.Context, name: str, accepts, *, mandatory: bool = False):
        """The ROUTER at RUN_DIR/<name>.sock that other actors send to, as a typed channel (an AsyncChannel
        on a zmq.asyncio context). A restarted sender reuses its identity (ROUTER_HANDOVER); `mandatory`:
        a reply to a sender that is gone raises instead of vanishing."""
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if mandatory:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.bind(self.plan.endpoint(f"{name}.sock"))
        channel = AsyncChannel if isinstance(ctx, zmq.asyncio.Context) else Channel
        return channel(sock, accepts, router=True, observer=self.probe.observe)

    def start_control(self) -> None:
        self._control_thread.start()

    def ready(self, detail: ReadyDetail) -> None:
        self._outbox.put(Ready(self.name, os.getpid(), detail, code=self.code))
        self.log.info("ready", code=self.code, **msgspec.structs.asdict(detail))

    def fatal(self, reason: str) -> None:
        self.log.error("fatal", reason=reason)
        self._outbox.put(Fatal(self.name, reason))

    def send_control(self, msg: Message) -> None:
        self._outbox.put(msg)

    def request_stop(self, grace: float) -> None:
        self.grace = grace
        self.stopping.set()
        self.on_stop()

    def publish_stats(self, every: float = 1.0) -> None:
        """Called from the main thread's loop: stats go to probes at most once per `every` seconds."""
        now = time.monotonic()
        if now - self._last_stats >= every:
            self._last_stats = now
            stats = self.stats
            if stats is not None:
                self.probe.publish("stats", "Stats", fields=msgspec.structs.asdict(stats))

    def _queue_control(self, msg: Message) -> None:
        self.control_inbox.put(msg)

    def async_control(self) -> "asyncio.Queue[Message]":
        """For actors with an event loop: control messages, Stop included, delivered on the loop's thread."""
        loop = asyncio.get_running_loop()
        queue_: asyncio.Queue = asyncio.Queue()
        self.on_control = lambda msg: loop.call_soon_threadsafe(queue_.put_nowait, msg)
        self.on_stop = lambda: loop.call_soon_threadsafe(queue_.put_nowait, Stop(self.grace))
        return queue_

    def _control_loop(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.name.encode())
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(self.plan.endpoint("control.sock"))
        channel = Channel(sock, ControlToActor)
        next_beat = 0.0
        try:
            while not self._closed:
                while True:
                    try:
                        channel.send(self._outbox.get_nowait())
                    except queue.Empty:
                        break
                now = time.monotonic()
                if now >= next_beat:
                    channel.send(Heartbeat(self.name, self.stats, os.getpid()))
                    next_beat = now + self.plan.heartbeat_interval
                if not sock.poll(100):
                    continue
                try:
                    envelope = channel.recv()
                except BadMessage as e:
                    self.log.warning("bad control message", reason=e.reason)
                    continue
                if isinstance(envelope.msg, Stop):
                    self.log.info("stop requested", grace=envelope.msg.grace)
                    self.request_stop(envelope.msg.grace)
                else:
                    self.on_control(envelope.msg)
        finally:
            # flush what the main thread queued last (Fatal, Announced) before the socket goes
            while True:
                try:
                    channel.send(self._outbox.get_nowait())
                except queue.Empty:
                    break
            sock.close()

    def close(self) -> None:
        self._closed = True
        if self._control_thread.is_alive():
            self._control_thread.join(timeout=2)
        self.probe.close()
        self.ctx.destroy(linger=0)


def run(main: Callable[[Actor], None], argv: Optional[list[str]] = None) -> None:
    """Entry point of every role module: `python -m procs.<role> RUN_DIR NAME`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write(f"usage: python -m procs.<role> RUN_DIR NAME (got {argv})\n")
        sys.exit(2)
    actor = Actor(argv[1], argv[0])
    actor.start_control()
    code = 0
    try:
        main(actor)
    except Exception as e:
        actor.log.exception("actor failed", error=repr(e))
        code = 1
    finally:
        actor.close()
    actor.log.info("exit", code=code)
    logs.exit_now(code)
