"""The KV-cache allocator process: admission to the attention cache, and the directory of live sessions.

Owns: the ROUTER `allocator.sock`, a DEALER to the runtime, and the admission of node/allocator/admission.py
  (which decides): the cache budget (bytes per session, leases that lapse, the queue of waiting sessions), the
  history budget (host memory in which frontends keep what sessions sent, to rebuild their caches on a
  replaced runtime) and the map session id -> owning frontend (for rpc_push).
Receives (ROUTER `allocator.sock`): Allocate, Release, GrowHistory, Adopt from frontends; CapacityQuery from
  frontends and the announcer; PushRoute from a frontend that got rpc_push.
  Control: PeerDown(frontend.N) drops that frontend's sessions.
Sends: Granted / Failure / Capacity replies; PushDelivery to the frontend owning a session;
  DropCache to the runtime (DEALER to `runtime.sock`) whenever a grant ends.
"""

from __future__ import annotations

from node import startup

startup.die_with_supervisor()  # before the imports below: see node/startup.py

import time

import zmq

from node.allocator.admission import Admission
from procs import actor as actor_lib
from protocol.messages import AllocatorInbox, DropCache, PeerDown, RuntimeReply, Serve
from protocol.transport import BadMessage, Channel


class AllocatorProcess:
    """Moves messages between the allocator socket, the control plane and the admission; decides nothing."""

    def __init__(self, actor: actor_lib.Actor):
        self.actor = actor
        self.log = actor.log
        self.inbox = actor.bind_inbox(actor.ctx, "allocator", AllocatorInbox, mandatory=True)
        runtime = actor.ctx.socket(zmq.DEALER)
        runtime.setsockopt(zmq.LINGER, 0)
        runtime.setsockopt(zmq.ROUTING_ID, actor.name.encode())
        runtime.connect(actor.plan.endpoint("runtime.sock"))
        self.runtime = Channel(runtime, RuntimeReply, observer=actor.probe.observe)
        self.admission = Admission(actor.plan, actor.log, self.reply, self.drop)

    def serve(self) -> None:
        self.actor.ready(self.admission.ready())
        while not self.actor.stopping.is_set():
            if self.inbox.sock.poll(self._poll_ms()):
                try:
                    envelope = self.inbox.recv()
                except BadMessage as e:
                    self.log.warning("bad message", reason=e.reason)
                    continue
                self.admission.take(envelope.sender, envelope.msg, envelope.frames)
            self.handle_control()
            self.admission.expire()
            self.actor.stats = self.admission.stats()
            self.actor.publish_stats()

    def _poll_ms(self) -> int:
        deadline = self.admission.next_deadline()
        if deadline is None:
            return 100
        return int(max(0, min(0.1, deadline - time.monotonic())) * 1000)

    def handle_control(self) -> None:
        while not self.actor.control_inbox.empty():
            msg = self.actor.control_inbox.get_nowait()
            if isinstance(msg, Serve):
                self.admission.resize(msg.end_block - msg.start_block)
            elif isinstance(msg, PeerDown) and msg.name.startswith("frontend"):
                self.admission.owner_down(msg.name)

    # --- sending -----------------------------------------------------------------------------

    def drop(self, handles: list[int]) -> None:
        self.runtime.send(DropCache(handles))

    def reply(self, to: bytes, msg, frames=()) -> None:
        try:
            self.inbox.send(msg, frames, to=to)
        except zmq.ZMQError as e:  # the frontend is gone; PeerDown will clean up after it
            self.log.info("reply undeliverable", to=to.decode(errors="replace"), error=str(e))


def main(actor: actor_lib.Actor) -> None:
    AllocatorProcess(actor).serve()


if __name__ == "__main__":
    actor_lib.run(main)
