"""The DHT announcer: the node's presence in the swarm (PROTOCOL 2).

Owns: a hivemind DHTNode attached to the supervisor's p2pd (so it answers DHT RPCs under the node's
  peer id, with a DHT id derived from it that survives restarts), and the node's ServerInfo.
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
from hivemind.p2p import P2P, PeerID
from hivemind.proto import dht_pb2
from hivemind.utils.multiaddr import Multiaddr

from node.announcer.next_pings import NextPings, peers_to_ping
from node.announcer.reachability import Reachability, Unreachable, confirm_public_reachability
from node.logs import quiet_hivemind
from procs import actor as actor_lib
from protocol import SERVER_VERSION
from protocol.dht_records import (
    MODELS_KEY,
    ServerInfo,
    ServerState,
    block_uids,
    model_record,
    read_model_record,
    read_servers,
    to_tuple,
)
from protocol.messages import (
    AllocatorReply,
    Announce,
    Announced,
    AnnouncerInbox,
    AnnouncerReady,
    AnnouncerStats,
    CapacityQuery,
    ModelServers,
    Serving,
    ServingQuery,
    Stop,
    SwarmMap,
    SwarmMapQuery,
    SwarmQuery,
    SwarmView,
)
from protocol.requester import Requester
from protocol.transport import AsyncChannel, BadMessage

SWARM_READ_TIMEOUT = 10.0  # seconds
MAX_MODELS = 8  # model prefixes read for the status page
MAX_MAP_BLOCKS = 1024  # larger models are left off the page
SERVING_MAX_AGE = 30.0  # a swarm read this recent answers a frontend's ServingQuery
RECHECK_AFTER = 5.0  # ... unless it says no and is older than this: then it is read again
PING_TIMEOUT = 5.0


class Announcer:
    def __init__(self, actor: actor_lib.Actor):
        self.actor = actor
        self.plan = actor.plan
        self.log = actor.log
        self.control = actor.async_control()
        ctx = zmq.asyncio.Context.shadow(actor.ctx)
        self.allocator = Requester.to_actor(actor, ctx, "allocator", AllocatorReply)
        self.dht: Optional[DHTNode] = None
        self.state: Optional[Announce] = None
        self.last_expiration = 0.0
        self.stored = 0
        self.pings = NextPings()
        self.using_relay = False
        self.swarm: Optional[tuple[float, dict]] = None  # (when, {block: {peer: ServerInfo}}) of the last read
        self.reading: Optional[asyncio.Future] = None  # the read under way, shared by whoever needs it
        inbox = ctx.socket(zmq.ROUTER)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted frontend reuses its identity
        inbox.bind(self.plan.endpoint("announcer.sock"))
        self.inbox = AsyncChannel(inbox, AnnouncerInbox, router=True, observer=actor.probe.observe)
        self.answering: Optional[asyncio.Task] = None

    async def start(self) -> None:
        self.allocator.start()
        p2p = await P2P.replicate(Multiaddr(self.plan.daemon_maddr))
        self.peer_id = p2p.peer_id.to_base58()
        self.reachability = Reachability(p2p, self.log)
        await self.reachability.serve()
        self.using_relay = await self.check_reachability(p2p)
        self.dht = await DHTNode.create(
            p2p=p2p,
            client_mode=self.using_relay,  # peers that cannot dial us must not route DHT queries to us
            node_id=DHTID.generate(source=p2p.peer_id.to_bytes()),
            initial_peers=self.plan.initial_peers,
            num_workers=max(1, self.plan.total_blocks),
            reuse_get_requests=False,  # a search stuck on a dead peer must not capture later reads
        )
        if self.plan.check_public_reachability:
            await confirm_public_reachability(self.peer_id, self.log)  # Unreachable stops the node
        self.answering = asyncio.get_running_loop().create_task(self.answer_queries())
        self.actor.ready(AnnouncerReady(peer_id=self.peer_id, using_relay=self.using_relay))

    async def check_reachability(self, p2p: P2P) -> bool:
        """Whether only relays reach us (PROTOCOL 5.10): asked of the swarm's peers at startup."""
        peers = {
            PeerID.from_base58(m.split("/p2p/")[-1].split("/")[0]) for m in self.plan.initial_peers if "/p2p/" in m
        }
        peers |= {info.peer_id for info in await p2p.list_peers()}
        peers.discard(p2p.peer_id)
        if not peers:
            return False  # a new swarm: nobody to ask
        began = time.perf_counter()
        reachable = await self.reachability.check_self(sorted(peers, key=str))
        self.log.info(
            "reachability checked",
            directly_reachable=reachable,
            asked=min(len(peers), 5),
            seconds=round(time.perf_counter() - began, 2),
        )
        return reachable is False

    # --- receiving ---------------------------------------------------------------------------

    async def serve(self) -> None:
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
                self.actor.send_control(await self.swarm_view(msg.req))
            elif isinstance(msg, SwarmMapQuery):
                self.actor.send_control(await self.swarm_map(msg.req))
            elif isinstance(msg, Announce):
                self.state = msg
                ok, error = await self.announce()
                msg.retire = None  # retired blocks are announced OFFLINE once, not refreshed
                self.actor.send_control(Announced(msg.state, ok, error))
                next_refresh = (
                    time.monotonic() + self.plan.update_period if msg.state != ServerState.OFFLINE else float("inf")
                )
            elif (
                self.state is not None and self.state.state != ServerState.OFFLINE and time.monotonic() >= next_refresh
            ):
                await self.announce()
                next_refresh = time.monotonic() + self.plan.update_period
            self.actor.stats = AnnouncerStats(state=self.state.state if self.state else -1, stored=self.stored)
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
        """Whether our view of the swarm shows the peer ONLINE on every block of the span; a view older
        than RECHECK_AFTER that says no is read again once (the peer may have joined since)."""
        serving = False
        for max_age in (SERVING_MAX_AGE, RECHECK_AFTER):
            try:
                servers = await self.read_swarm(max_age)
            except Exception as e:
                self.log.info("cannot read the swarm", error=repr(e))
                break
            serving = all(
                query.peer in servers.get(b, {}) and servers[b][query.peer].state == ServerState.ONLINE
                for b in range(query.start, query.end)
            )
            if serving or time.monotonic() - self.swarm[0] <= RECHECK_AFTER:
                break
        try:
            self.inbox.send(Serving(query.req, serving), to=frontend)
        except zmq.ZMQError:
            pass  # the frontend is gone

    async def read_swarm(self, max_age: float) -> dict:
        """{block: {peer: ServerInfo}} of every block, read as clients read it; a read at most `max_age`
        seconds old is reused, and callers at the same time share one read."""
        if self.swarm is not None and time.monotonic() - self.swarm[0] <= max_age:
            return self.swarm[1]
        if self.reading is None or self.reading.done():
            self.reading = asyncio.ensure_future(self._read_swarm())
        return await asyncio.shield(self.reading)

    async def _read_swarm(self) -> dict:
        # hivemind's search can wait forever on a peer that died mid-traversal: bound it
        servers = await asyncio.wait_for(
            read_servers(self.dht, self.plan.dht_prefix, self.plan.total_blocks), SWARM_READ_TIMEOUT
        )
        self.swarm = (time.monotonic(), servers)
        return servers

    async def cache_tokens_left(self) -> Optional[int]:
        try:
            reply = await self.allocator.request(CapacityQuery(self.allocator.next_id()), timeout=2)
        except Exception:
            return None  # allocator restarting: publish "unknown" rather than a wrong number
        return reply.msg.tokens_left

    # --- sending -----------------------------------------------------------------------------

    async def swarm_view(self, req: int) -> SwarmView:
        began = time.perf_counter()
        try:
            servers = await self.read_swarm(max_age=0.0)
        except (Exception, asyncio.TimeoutError) as e:
            self.log.warning("cannot read the swarm", error=repr(e))
            return SwarmView(req, error=repr(e))
        blocks = {index: dict(infos) for index, infos in servers.items()}
        self.log.info(
            "swarm read",
            servers=len({p for infos in servers.values() for p in infos}),
            peers=len(self.dht.protocol.routing_table.uid_to_peer_id),
            seconds=round(time.perf_counter() - began, 3),
        )
        return SwarmView(req, blocks)

    async def swarm_map(self, req: int) -> SwarmMap:
        """Every model the swarm announces under MODELS_KEY and its servers: ours first, then the others by
        name, at most MAX_MODELS of at most MAX_MAP_BLOCKS blocks (the public swarm holds dozens)."""
        try:
            found = await asyncio.wait_for(self.dht.get(MODELS_KEY, latest=True), SWARM_READ_TIMEOUT)
            records = found.value if found is not None and isinstance(found.value, dict) else {}
            sizes = {self.plan.dht_prefix: (self.plan.total_blocks, None)}
            for prefix, item in records.items():
                try:
                    if isinstance(prefix, str) and prefix != self.plan.dht_prefix:
                        sizes[prefix] = read_model_record(item.value)
                except (TypeError, ValueError):
                    continue  # a record clients would skip
            chosen = [self.plan.dht_prefix] + sorted(p for p in sizes if p != self.plan.dht_prefix)
            models = {}
            for prefix in chosen[:MAX_MODELS]:
                num_blocks, repository = sizes[prefix]
                if num_blocks > MAX_MAP_BLOCKS:
                    continue
                blocks = await asyncio.wait_for(read_servers(self.dht, prefix, num_blocks), SWARM_READ_TIMEOUT)
                models[prefix] = ModelServers(num_blocks, repository, blocks)
        except (Exception, asyncio.TimeoutError) as e:
            self.log.info("cannot read the swarm's models", error=repr(e))
            return SwarmMap(req, error=repr(e))
        return SwarmMap(req, models)

    async def ping_next(self, state: Announce) -> dict[str, float]:
        """Ping the servers that follow our span (PROTOCOL 2.4) and return the smoothed round trips."""
        try:
            infos = await self.read_swarm(max_age=0.0)
        except Exception as e:
            self.log.info("cannot read the next servers", error=repr(e))
            return self.pings.current()
        peers = peers_to_ping(infos, state.start_block, state.end_block, self.peer_id)
        rtts = await asyncio.gather(*(self.ping(peer) for peer in peers))
        for peer, rtt in zip(peers, rtts):
            self.pings.update(peer, rtt)
        return self.pings.current()

    async def ping(self, peer: str) -> float:
        request = dht_pb2.PingRequest(peer=self.dht.protocol.node_info)
        began = time.perf_counter()
        try:
            await self.dht.protocol.get_stub(PeerID.from_base58(peer)).rpc_ping(request, timeout=PING_TIMEOUT)
        except Exception as e:
            if "protocol not supported" in str(e):  # a DHT client: reachable, it just serves no DHT
                return time.perf_counter() - began
            return float("inf")
        return time.perf_counter() - began

    def server_info(self, state: Announce, tokens_left: Optional[int], next_pings: Optional[dict] = None) -> ServerInfo:
        plan = self.plan
        return ServerInfo(
            state=ServerState(state.state),
            throughput=float(state.throughput),
            start_block=state.start_block,
            end_block=state.end_block,
            public_name=plan.public_name,
            version=SERVER_VERSION,
            network_rps=state.network_rps,
            forward_rps=state.forward_rps,
            inference_rps=state.inference_rps,
            adapters=tuple(plan.adapters),
            torch_dtype=plan.torch_dtype,
            quant_type=state.quant_type or plan.quant_type,
            using_relay=self.using_relay,
            cache_tokens_left=tokens_left,
            next_pings=None if state.state == ServerState.OFFLINE else (next_pings or {}),
        )

    async def announce(self) -> tuple[bool, str]:
        state = self.state
        pings = await self.ping_next(state) if state.state != ServerState.OFFLINE else None
        info = self.server_info(state, await self.cache_tokens_left(), pings)
        uids = block_uids(self.plan.dht_prefix, state.start_block, state.end_block)
        # every refresh must expire strictly later than the last one or DHT nodes reject it
        expiration = max(time.time() + self.plan.expiration, self.last_expiration + 0.001)
        self.last_expiration = expiration
        began = time.perf_counter()
        values = [to_tuple(info)] * len(uids)
        if state.retire is not None:  # blocks left behind by a move: OFFLINE, then they expire
            retired = [uid for uid in block_uids(self.plan.dht_prefix, *state.retire) if uid not in uids]
            offline = to_tuple(self.server_info(Announce(int(ServerState.OFFLINE), *state.retire), None))
            uids, values = uids + retired, values + [offline] * len(retired)
        try:
            results = await asyncio.wait_for(
                self.dht.store_many(uids, values, expiration, subkeys=[self.peer_id] * len(uids)), SWARM_READ_TIMEOUT
            )
            ok = all(results.values())
            if state.state != ServerState.OFFLINE and not self.plan.dht_prefix.startswith("_"):
                record = model_record(self.plan.total_blocks, self.plan.repository)
                await asyncio.wait_for(
                    self.dht.store(MODELS_KEY, record, expiration, subkey=self.plan.dht_prefix), SWARM_READ_TIMEOUT
                )
        except Exception as e:
            self.log.warning("announce failed", state=ServerState(state.state).name, error=repr(e))
            return False, repr(e)
        self.stored += 1
        self.log.info(
            "announced",
            state=ServerState(state.state).name,
            blocks=[state.start_block, state.end_block],
            ok=ok,
            cache_tokens_left=info.cache_tokens_left,
            seconds=round(time.perf_counter() - began, 3),
        )
        return ok, "" if ok else "some DHT stores were refused"

    async def close(self) -> None:
        if self.answering is not None:
            self.answering.cancel()
        self.inbox.sock.close(0)
        self.allocator.close()
        if getattr(self, "reachability", None) is not None:
            await self.reachability.close()
        if self.dht is not None:
            await self.dht.shutdown()


async def amain(actor: actor_lib.Actor) -> None:
    quiet_hivemind()
    announcer = Announcer(actor)
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
