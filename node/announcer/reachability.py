"""Can other peers dial this node directly? The `rpc_check` protocol of Petals (PROTOCOL 5.10).

Owned by the announcer, on the node's p2pd:
- it serves `ReachabilityProtocol.rpc_check` to the swarm. Asked about itself, it answers yes; asked
  about another peer, it dials that peer's rpc_check from a separate "probe" p2pd that has no relay,
  no NAT traversal and no listen address of its own, so that only a direct connection can succeed
  (the node's own connections, which the asking peer opened, would prove nothing);
- at startup it asks up to five peers to check it. A majority of "no" means the node is reachable
  only through relays: it announces `using_relay`, takes the relay penalty in its throughput and runs
  its DHT in client mode. Nobody answering means unknown, and the node assumes it is reachable.
"""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import dht_pb2

HANDLER = "ReachabilityProtocol.rpc_check"
CHECK_TIMEOUT = 10.0
PROBE_TIMEOUT = 5.0


class Reachability:
    def __init__(self, p2p: P2P, log):
        self.p2p = p2p
        self.log = log
        self.probe: Optional[P2P] = None
        self.probe_lock = asyncio.Lock()

    async def serve(self) -> None:
        await self.p2p.add_protobuf_handler(HANDLER, self.rpc_check, dht_pb2.PingRequest)

    # --- receiving ---------------------------------------------------------------------------

    async def rpc_check(self, request: dht_pb2.PingRequest, context: P2PContext) -> dht_pb2.PingResponse:
        try:
            target = PeerID(request.peer.node_id)
        except Exception:
            return dht_pb2.PingResponse(available=False)
        if target == self.p2p.peer_id:
            return dht_pb2.PingResponse(available=True)
        try:
            probe = await self.get_probe()
            await asyncio.wait_for(
                probe.call_protobuf_handler(target, HANDLER, dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=target.to_bytes())),
                                            dht_pb2.PingResponse),
                PROBE_TIMEOUT,
            )
            available = True
        except Exception as e:
            self.log.info("peer not directly reachable", peer=target.to_base58(), error=repr(e)[:200])
            available = False
        return dht_pb2.PingResponse(available=available)

    async def get_probe(self) -> P2P:
        async with self.probe_lock:
            if self.probe is None:
                # it finds the peer through our p2pd's libp2p DHT, then may only dial it directly
                maddrs = [str(m) for m in await self.p2p.get_visible_maddrs()]
                self.probe = await P2P.create(
                    initial_peers=[f"{m}/p2p/{self.p2p.peer_id}" if "/p2p/" not in m else m for m in maddrs],
                    dht_mode="client", use_relay=False, use_auto_relay=False, auto_nat=False, nat_port_map=False,
                    host_maddrs=[], startup_timeout=60,
                )
        return self.probe

    # --- sending -----------------------------------------------------------------------------

    async def check_self(self, peers: Sequence[PeerID], max_peers: int = 5, threshold: float = 0.5) -> Optional[bool]:
        """Ask peers to dial us back: True/False by the share of yes among the answers, None if none."""
        request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=self.p2p.peer_id.to_bytes()))

        async def ask(peer: PeerID) -> Optional[bool]:
            try:
                response = await asyncio.wait_for(self.p2p.call_protobuf_handler(peer, HANDLER, request, dht_pb2.PingResponse), CHECK_TIMEOUT)
                return bool(response.available)
            except Exception:
                return None  # no answer (an old server, a client): not a vote

        answers = [a for a in await asyncio.gather(*(ask(p) for p in list(peers)[:max_peers])) if a is not None]
        if not answers:
            return None
        return sum(answers) / len(answers) >= threshold

    async def close(self) -> None:
        if self.probe is not None:
            await self.probe.shutdown()
            self.probe = None
