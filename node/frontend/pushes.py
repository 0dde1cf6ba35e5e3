"""Pushes to the next server of a v2.2.0 client's chain (PROTOCOL 3.7): after a step, our output goes
straight to the server the client named next, if the swarm shows that peer serving those blocks (anyone
can name any peer in next_servers). A push only races the client's own copy of the step, so one that
cannot be made is skipped, never an error."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from hivemind.proto import runtime_pb2

from node.frontend.counters import Counters
from protocol import wire
from protocol.messages import ServingQuery
from protocol.plan import NodePlan
from protocol.requester import PeerUnavailable, Requester

PUSH_NAME = "TransformerConnectionHandler.rpc_push"
PUSH_KEYS = ("step_id", "start_from_position", "args_structure", "points")  # what a pushed step carries on
MAX_PUSHES = 64  # pushes to next servers under way at once; more are skipped (the client sends its own copy)
SERVING_TTL = 60.0  # seconds an answer of the announcer about a push target is trusted
NOT_SERVING_TTL = 5.0


class Pushes:
    def __init__(self, plan: NodePlan, log, announcer: Requester, counters: Counters):
        self.plan = plan
        self.log = log
        self.announcer = announcer
        self.counters = counters
        self.p2p = None  # set by the frontend once attached to p2pd
        self.under_way: set[asyncio.Task] = set()
        self.serving: dict[tuple[str, int, int], tuple[bool, float]] = {}  # push targets: (serving, until)

    def push_next(self, output: runtime_pb2.Tensor, request, metadata: dict, servers: list, from_peer: str) -> None:
        """Push `output` (a step's, encoded) to servers[0] in the background, at most MAX_PUSHES at once."""
        if len(self.under_way) >= MAX_PUSHES:
            self.counters.refuse("pushes", "", f"{len(self.under_way)} pushes under way; this one is skipped")
            return
        task = asyncio.get_running_loop().create_task(self._push(output, request, metadata, servers, from_peer))
        self.under_way.add(task)
        task.add_done_callback(self.under_way.discard)

    async def serves(self, peer: str, start: int, end: int) -> bool:
        """Whether the announcer's view of the swarm shows `peer` serving blocks [start, end)."""
        key = (peer, start, end)
        known: Optional[tuple[bool, float]] = self.serving.get(key)
        now = time.monotonic()
        if known is not None and now < known[1]:
            return known[0]
        try:
            reply = await self.announcer.request(ServingQuery(self.announcer.next_id(), peer, start, end), timeout=10)
            serving = reply.msg.serving
        except (asyncio.TimeoutError, PeerUnavailable):
            return False  # the announcer is restarting: no push now, the client sends its own copy
        if len(self.serving) > 4096:  # peers come and go: forget them all rather than grow
            self.serving.clear()
        self.serving[key] = (serving, now + (SERVING_TTL if serving else NOT_SERVING_TTL))
        return serving

    async def _push(self, output, request, metadata: dict, servers: list, from_peer: str) -> None:
        from hivemind.p2p import PeerID

        peer, session_id, start, end = servers[0]
        if not await self.serves(peer, start, end):
            self.counters.refuse("push_target", from_peer, f"{peer} is not seen serving blocks {start}:{end}")
            return
        forwarded = {key: metadata[key] for key in PUSH_KEYS if key in metadata}
        forwarded.update(session_id=session_id, next_servers=[tuple(s) for s in servers[1:]], pushed=True)
        pushed = runtime_pb2.ExpertRequest(
            uid=" ".join(f"{self.plan.dht_prefix}.{i}" for i in range(start, end)),
            tensors=[output, *request.tensors[1:]],
            metadata=wire.pack_metadata(forwarded),
        )
        try:
            await asyncio.wait_for(
                self.p2p.call_protobuf_handler(PeerID.from_base58(peer), PUSH_NAME, pushed, runtime_pb2.ExpertResponse),
                self.plan.request_timeout,
            )
        except Exception as e:
            self.log.debug("push failed", peer=peer, error=repr(e))
