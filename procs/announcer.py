"""The DHT announcer process: the node's presence in the swarm (PROTOCOL 2).

Owns: the ROUTER `announcer.sock`, a requester to the allocator, a hivemind DHTNode attached to the
  supervisor's p2pd (so it answers DHT RPCs under the node's peer id, with a DHT id derived from it that
  survives restarts) and the presence of node/announcer/presence.py, which decides what is stored and read.
Receives: Announce(state, blocks, throughput), SwarmQuery and SwarmMapQuery (every model the swarm
  announces, for the status page) from the supervisor; Capacity from the
  allocator; ServingQuery from frontends (ROUTER `announcer.sock`: may we push to this peer?); Stop.
Sends: the per-block records and the `_petals.models` record, refreshed every `update_period` with
  a later expiration each time (with next_pings: round trips to the servers after ours, pinged
  just before); Announced to the supervisor after each state change; SwarmView (the
  swarm's records, for block selection and rebalancing) and SwarmMap; Serving to frontends; CapacityQuery.
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
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

from node import msgpack_depth
from node.announcer.presence import Presence
from node.announcer.reachability import Reachability, Unreachable, confirm_public_reachability, only_relays_reach
from node.logs import quiet_hivemind
from procs import actor as actor_lib
from protocol.dht_records import ServerState
from protocol.messages import (
    AllocatorReply,
    Announce,
    Announced,
    AnnouncerInbox,
    AnnouncerReady,
    AnnouncerStats,
    CapacityQuery,
    Serving,
    ServingQuery,
    Stop,
    SwarmMapQuery,
    SwarmQuery,
)
from protocol.requester import Requester
from protocol.transport import BadMessage


class AnnouncerProcess:
    """Moves the supervisor's orders and the frontends' queries to the presence; decides nothing."""

    def __init__(self, actor: actor_lib.Actor):
        self.actor = actor
        self.plan = actor.plan
        self.log = actor.log
        self.control = actor.async_control()
        ctx = zmq.asyncio.Context.shadow(actor.ctx)
        self.allocator = Requester.to_actor(actor, ctx, "allocator", AllocatorReply)
        self.dht: Optional[DHTNode] = None
        self.reachability: Optional[Reachability] = None
        self.presence: Optional[Presence] = None
        self.state: Optional[Announce] = None
        self.inbox = actor.bind_inbox(ctx, "announcer", AnnouncerInbox)
        self.answering: Optional[asyncio.Task] = None

    async def start(self) -> None:
        self.allocator.start()
        p2p = await P2P.replicate(Multiaddr(self.plan.daemon_maddr))
        peer_id = p2p.peer_id.to_base58()
        self.reachability = Reachability(p2p, self.log)
        await self.reachability.serve()
        using_relay = await only_relays_reach(p2p, self.reachability, self.plan.initial_peers, self.log)
        self.dht = await DHTNode.create(
            p2p=p2p,
            client_mode=using_relay,  # peers that cannot dial us must not route DHT queries to us
            node_id=DHTID.generate(source=p2p.peer_id.to_bytes()),
            initial_peers=self.plan.initial_peers,
            num_workers=max(1, self.plan.total_blocks),
            reuse_get_requests=False,  # a search stuck on a dead peer must not capture later reads
        )
        if self.plan.check_public_reachability:
            await confirm_public_reachability(peer_id, self.log)  # Unreachable stops the node
        self.presence = Presence(self.plan, self.log, self.dht, peer_id, using_relay, self.cache_tokens_left)
        self.answering = asyncio.get_running_loop().create_task(self.answer_queries())
        self.actor.ready(AnnouncerReady(peer_id=peer_id, using_relay=using_relay))

    # --- receiving ---------------------------------------------------------------------------

    async def serve(self) -> None:
        presence = self.presence
        next_refresh = float("inf")
        while True:
            # never a zero timeout: wait_for(get(), 0) cancels the get before it can take a message
            timeout = min(max(0.05, next_refresh - time.monotonic()), 1.0)
            try:
                msg = self.control.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    msg = await asyncio.wait_for(self.control.get(), timeout=timeout)
                except asyncio.TimeoutError:
                    msg = None
            if isinstance(msg, Stop):
                return
            if isinstance(msg, SwarmQuery):
                self.actor.send_control(await presence.swarm_view(msg.req))
            elif isinstance(msg, SwarmMapQuery):
                self.actor.send_control(await presence.swarm_map(msg.req))
            elif isinstance(msg, Announce):
                self.state = msg
                ok, error = await presence.announce(msg)
                msg.retire = None  # retired blocks are announced OFFLINE once, not refreshed
                self.actor.send_control(Announced(msg.state, ok, error))
                next_refresh = (
                    time.monotonic() + self.plan.update_period if msg.state != ServerState.OFFLINE else float("inf")
                )
            elif (
                self.state is not None and self.state.state != ServerState.OFFLINE and time.monotonic() >= next_refresh
            ):
                await presence.announce(self.state)
                next_refresh = time.monotonic() + self.plan.update_period
            self.actor.stats = AnnouncerStats(state=self.state.state if self.state else -1, stored=presence.stored)
            self.actor.publish_stats()

    async def answer_queries(self) -> None:
        while True:
            try:
                envelope = await self.inbox.recv()
            except BadMessage as e:
                self.log.warning("bad message", reason=e.reason)
                continue
            if isinstance(envelope.msg, ServingQuery):
                asyncio.get_running_loop().create_task(self.answer_serving(envelope.sender, envelope.msg))

    async def answer_serving(self, frontend: bytes, query: ServingQuery) -> None:
        serving = await self.presence.serving(query)
        try:
            self.inbox.send(Serving(query.req, serving), to=frontend)
        except zmq.ZMQError:
            pass  # the frontend is gone

    async def cache_tokens_left(self) -> Optional[int]:
        try:
            reply = await self.allocator.request(CapacityQuery(self.allocator.next_id()), timeout=2)
        except Exception:
            return None  # allocator restarting: publish "unknown" rather than a wrong number
        return reply.msg.tokens_left

    async def close(self) -> None:
        if self.answering is not None:
            self.answering.cancel()
        self.inbox.close(0)
        self.allocator.close()
        if self.reachability is not None:
            await self.reachability.close()
        if self.dht is not None:
            await self.dht.shutdown()


async def amain(actor: actor_lib.Actor) -> None:
    quiet_hivemind()
    msgpack_depth.install()  # before the DHT decodes anything a peer sent
    announcer = AnnouncerProcess(actor)
    try:
        await announcer.start()
        await announcer.serve()
    except Unreachable as e:
        actor.fatal(str(e))  # a restart would not change what the swarm can reach
    finally:
        await announcer.close()


def main(actor: actor_lib.Actor) -> None:
    asyncio.run(amain(actor))


if __name__ == "__main__":
    actor_lib.run(main)
