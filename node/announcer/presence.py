"""The node's presence in the swarm: its records in the DHT and its view of everyone else's (PROTOCOL 2).

No ZeroMQ: procs/announcer.py gives it the DHT node (attached to the node's p2pd) and a way to ask the
allocator how much cache is left, and calls it for each order and query. What it stores: one record per
served block under the node's peer id (its ServerInfo, with next_pings: round trips to the servers after
ours, pinged just before) and the `_petals.models` record; every store expires later than the one before.
What it reads: every block's servers as clients read them, reused for a few seconds and shared by
callers at the same time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Optional

from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID
from hivemind.proto import dht_pb2

from node.announcer.next_pings import NextPings, peers_to_ping
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
from protocol.messages import Announce, ModelServers, ServingQuery, SwarmMap, SwarmView
from protocol.plan import NodePlan

SWARM_READ_TIMEOUT = 10.0  # seconds
MAX_MODELS = 8  # model prefixes read for the status page
MAX_MAP_BLOCKS = 1024  # larger models are left off the page
SERVING_MAX_AGE = 30.0  # a swarm read this recent answers a frontend's ServingQuery
RECHECK_AFTER = 5.0  # ... unless it says no and is older than this: then it is read again
PING_TIMEOUT = 5.0


class Presence:
    def __init__(
        self,
        plan: NodePlan,
        log,
        dht: DHTNode,
        peer_id: str,
        using_relay: bool,
        tokens_left: Callable[[], Awaitable[Optional[int]]],
    ):
        self.plan = plan
        self.log = log
        self.dht = dht
        self.peer_id = peer_id
        self.using_relay = using_relay
        self.tokens_left = tokens_left  # the allocator's cache_tokens_left; None while it restarts
        self.last_expiration = 0.0
        self.stored = 0
        self.pings = NextPings()
        self.swarm: Optional[tuple[float, dict]] = None  # (when, {block: {peer: ServerInfo}}) of the last read
        self.reading: Optional[asyncio.Future] = None  # the read under way, shared by whoever needs it

    # --- reading the swarm -------------------------------------------------------------------

    async def serving(self, query: ServingQuery) -> bool:
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
        return serving

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

    # --- announcing ---------------------------------------------------------------------------

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

    async def announce(self, state: Announce) -> tuple[bool, str]:
        pings = await self.ping_next(state) if state.state != ServerState.OFFLINE else None
        info = self.server_info(state, await self.tokens_left(), pings)
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
