"""What a frontend lets strangers make it hold: request sizes, and bytes in flight per peer and in all.

Any peer on the internet can open streams to the node, so every request reserves its bytes before the
frontend reads them (DESIGN section 5, after libp2p's resource manager): in the scope of this frontend
and in the scope of the peer that sent it. A request larger than its kind can need is refused at once;
one that does not fit the scopes now waits a little for room (backpressure), then is refused. Each
refusal has a reason, counted in node_refused_total{reason}.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

FLOAT_BYTES = 4  # the widest activations a request may carry (float32)
SLACK_BYTES = 1 << 20  # metadata and protobuf framing around the tensors
WAIT_FOR_ROOM = 5.0  # seconds a request waits for room in its scopes before it is refused


class Refused(Exception):
    """A request over a limit; the message tells the client which."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RequestSizes:
    """The most bytes each kind of request can need on this node (PROTOCOL 3.4-3.6): hidden states of
    --max_batch_size tokens, deep prompts for every served block, gradients, hypo_ids."""

    hidden_size: int
    max_tokens: int
    num_blocks: int

    @classmethod
    def of(cls, plan) -> "RequestSizes":
        """The most each kind of request can need now (the blocks served change with moves)."""
        return cls(plan.hidden_size, plan.max_batch_size, plan.end_block - plan.start_block)

    @property
    def hidden(self) -> int:
        return self.max_tokens * self.hidden_size * FLOAT_BYTES

    @property
    def prompts(self) -> int:
        return self.num_blocks * self.hidden

    @property
    def forward(self) -> int:
        return self.hidden + self.prompts + SLACK_BYTES

    @property
    def backward(self) -> int:
        return 2 * self.hidden + self.prompts + SLACK_BYTES

    @property
    def step(self) -> int:
        return self.hidden + self.prompts + self.max_tokens * 8 + SLACK_BYTES

    @property
    def largest(self) -> int:
        return max(self.forward, self.backward, self.step)

    def stream(self, rpc: str) -> tuple[int, Optional[int]]:
        """(one message, the whole stream) of a stream RPC: an inference stream is a session of steps, each
        at most one step's size, with no total; a forward or backward stream is one request in parts."""
        if rpc == "rpc_inference":
            return self.step, None
        total = self.forward if rpc == "rpc_forward_stream" else self.backward
        return total, total


class Scopes:
    """Bytes reserved by requests in flight: in all (this process) and per peer."""

    @classmethod
    def of(cls, plan) -> "Scopes":
        return cls(*cls.limits(plan))

    @staticmethod
    def limits(plan) -> tuple[int, int]:
        """(in all, per peer): what a node's process applies (--max_bytes_in_flight, --max_peer_bytes_in_flight),
        by default 4 and 2 times the largest request."""
        largest = RequestSizes.of(plan).largest
        return plan.max_bytes_in_flight or 4 * largest, plan.max_peer_bytes_in_flight or 2 * largest

    def follow(self, plan) -> None:
        """The blocks served changed (chosen once the node has started, or a move): the default limits follow
        the largest request now (deep prompts grow with the blocks served). What is held stays held."""
        self.total_limit, self.peer_limit = self.limits(plan)
        self._freed.set()  # a larger limit may make room for a request that waits

    def __init__(self, total: int, per_peer: int):
        self.total_limit = total
        self.peer_limit = per_peer
        self.used = 0
        self.by_peer: dict[str, int] = {}
        self._freed = asyncio.Event()

    def _fits(self, peer: str, nbytes: int) -> Optional[Refused]:
        if self.by_peer.get(peer, 0) + nbytes > self.peer_limit:
            return Refused(
                "peer_bytes",
                f"your requests in flight hold {self.by_peer.get(peer, 0)} bytes here, and {nbytes} more would "
                f"exceed the limit of {self.peer_limit} per peer; retry when they are done",
            )
        if self.used + nbytes > self.total_limit:
            return Refused(
                "server_bytes",
                f"the server holds {self.used} bytes of requests in flight, and {nbytes} more would exceed "
                f"its limit of {self.total_limit}; retry later",
            )
        return None

    async def reserve(self, peer: str, nbytes: int, wait: float = WAIT_FOR_ROOM) -> None:
        """Reserve `nbytes` for `peer`, waiting up to `wait` seconds for room; Refused if there is none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while (refusal := self._fits(peer, nbytes)) is not None:
            left = deadline - loop.time()
            if left <= 0 or nbytes > min(self.peer_limit, self.total_limit):
                raise refusal
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except asyncio.TimeoutError:
                pass
        self.used += nbytes
        self.by_peer[peer] = self.by_peer.get(peer, 0) + nbytes

    def release(self, peer: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        self.used -= nbytes
        left = self.by_peer.get(peer, 0) - nbytes
        if left > 0:
            self.by_peer[peer] = left
        else:
            self.by_peer.pop(peer, None)
        self._freed.set()
