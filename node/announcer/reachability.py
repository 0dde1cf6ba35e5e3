"""Can other peers dial this node directly? The `rpc_check` protocol of Petals (PROTOCOL 5.10).

Owned by the announcer, on the node's p2pd:
- it serves `ReachabilityProtocol.rpc_check` to the swarm. Asked about itself, it answers yes; asked
  about another peer, it dials that peer's rpc_check from a separate "probe" p2pd that has no relay,
  no NAT traversal and no listen address of its own, so that only a direct connection can succeed
  (the node's own connections, which the asking peer opened, would prove nothing);
- at startup it asks up to five peers to check it. A majority of "no" means the node is reachable
  only through relays: it announces `using_relay`, takes the relay penalty in its throughput and runs
  its DHT in client mode. Nobody answering means unknown, and the node assumes it is reachable.
In the public swarm it also asks Petals' health monitor whether the node can be reached before the
node joins (`confirm_public_reachability`), as Petals servers do unless --skip_reachability_check.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import dht_pb2

HANDLER = "ReachabilityProtocol.rpc_check"
CHECK_TIMEOUT = 10.0
PROBE_TIMEOUT = 5.0
ROUTING_NOT_YET = ("failed to find any peer in table", "routing: not found")  # p2pd: no route to the peer yet
ROUTING_RETRY = 0.5  # seconds before looking a peer up again


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
        deadline = asyncio.get_running_loop().time() + PROBE_TIMEOUT
        while True:
            try:
                probe = await self.get_probe()
                await asyncio.wait_for(
                    probe.call_protobuf_handler(
                        target,
                        HANDLER,
                        dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=target.to_bytes())),
                        dht_pb2.PingResponse,
                    ),
                    max(0.1, deadline - asyncio.get_running_loop().time()),
                )
                return dht_pb2.PingResponse(available=True)
            except Exception as e:
                # A peer that has just joined may not be in the routing tables yet (the probe's own, or our
                # daemon's): that says nothing about whether it can be dialed, so look it up again a little
                # later, within the same time limit. A dial that fails is an answer.
                unrouted = any(words in str(e) for words in ROUTING_NOT_YET)
                if unrouted and asyncio.get_running_loop().time() + ROUTING_RETRY < deadline:
                    await asyncio.sleep(ROUTING_RETRY)
                    continue
                self.log.info("peer not directly reachable", peer=target.to_base58(), error=repr(e)[:200])
                return dht_pb2.PingResponse(available=False)

    async def get_probe(self) -> P2P:
        async with self.probe_lock:
            if self.probe is None:
                # it finds the peer through our p2pd's libp2p DHT, then may only dial it directly
                maddrs = [str(m) for m in await self.p2p.get_visible_maddrs()]
                self.probe = await P2P.create(
                    initial_peers=[f"{m}/p2p/{self.p2p.peer_id}" if "/p2p/" not in m else m for m in maddrs],
                    dht_mode="client",
                    use_relay=False,
                    use_auto_relay=False,
                    auto_nat=False,
                    nat_port_map=False,
                    host_maddrs=[],
                    startup_timeout=60,
                )
        return self.probe

    # --- sending -----------------------------------------------------------------------------

    async def check_self(self, peers: Sequence[PeerID], max_peers: int = 5, threshold: float = 0.5) -> Optional[bool]:
        """Ask peers to dial us back: True/False by the share of yes among the answers, None if none."""
        request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=self.p2p.peer_id.to_bytes()))

        async def ask(peer: PeerID) -> Optional[bool]:
            try:
                response = await asyncio.wait_for(
                    self.p2p.call_protobuf_handler(peer, HANDLER, request, dht_pb2.PingResponse), CHECK_TIMEOUT
                )
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


# --- the public swarm's health monitor ---------------------------------------------------------------

HEALTH_URL = "https://health.petals.dev/api/v1/is_reachable/{peer_id}"


class Unreachable(Exception):
    """The health monitor kept failing to reach the node: clients will not reach it either."""


def _ask(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (a fixed https URL, or a test's)
        answer = json.loads(response.read())
    if not isinstance(answer, dict):
        raise ValueError(f"unexpected answer {answer!r}")
    return answer


async def confirm_public_reachability(
    peer_id: str,
    log,
    *,
    url: str = HEALTH_URL,
    retry_every: float = 15.0,
    give_up_after: float = 420.0,
    timeout: float = 10.0,
) -> None:
    """Ask health.petals.dev whether it can reach `peer_id`, every `retry_every` seconds for up to
    `give_up_after`; raise Unreachable if it never could. A monitor that cannot be asked (down, or no
    internet) skips the check."""
    deadline = time.monotonic() + give_up_after
    while True:
        try:
            answer = await asyncio.to_thread(_ask, url.format(peer_id=peer_id), timeout)
        except (OSError, ValueError, urllib.error.URLError) as e:
            log.warning("the health monitor cannot be asked; public reachability not checked", error=str(e))
            return
        if answer.get("success"):
            log.info("the health monitor reaches the node", your_ip=answer.get("your_ip"))
            return
        message = str(answer.get("message", ""))
        if time.monotonic() + retry_every > deadline:
            raise Unreachable(
                f"the swarm cannot reach this node: {message or 'no details'} (your IP: {answer.get('your_ip')}); "
                "make it reachable, e.g. with --public_ip and --port, or pass --skip_reachability_check"
            )
        log.warning("the health monitor cannot reach the node yet; asking again", message=message, retry_in=retry_every)
        await asyncio.sleep(retry_every)


async def only_relays_reach(p2p, reachability: "Reachability", initial_peers: list, log) -> bool:
    """Whether only relays reach us (PROTOCOL 5.10): asked of the swarm's peers at startup."""
    peers = {PeerID.from_base58(m.split("/p2p/")[-1].split("/")[0]) for m in initial_peers if "/p2p/" in m}
    peers |= {info.peer_id for info in await p2p.list_peers()}
    peers.discard(p2p.peer_id)
    if not peers:
        return False  # a new swarm: nobody to ask
    began = time.perf_counter()
    reachable = await reachability.check_self(sorted(peers, key=str))
    log.info(
        "reachability checked",
        directly_reachable=reachable,
        asked=min(len(peers), 5),
        seconds=round(time.perf_counter() - began, 2),
    )
    return reachable is False
