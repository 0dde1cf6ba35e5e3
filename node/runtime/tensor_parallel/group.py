"""One runtime's membership in the node's tensor-parallel group (PROTOCOL 5.13, DESIGN section 2).

The ranks form a torch.distributed group (gloo on CPUs, NCCL on GPUs) for the reductions inside the
sharded blocks (node/runtime/tensor_parallel/shard.py). Rank 0 leads: it alone receives work, validates and
schedules it,
and before each computation pushes the same message to every other rank over ZeroMQ (a PUSH socket
per rank, so each rank sees rank 0's computations in rank 0's order); the other ranks repeat it on
their shards. A step costs that one message and the reductions.

The group rendezvous is a file store whose path the supervisor hands to each incarnation of the
group ($NODE_TP_STORE): a group restarted after a failure never meets a stale store.
"""

from __future__ import annotations

import datetime
import os
from typing import Sequence

import torch
import torch.distributed as dist
import zmq

from protocol.messages import GroupInbox, Message
from protocol.plan import TP_STORE_ENV
from protocol.transport import Channel


def rank_of(name: str) -> int:
    """runtime.K is rank K."""
    return int(name.rsplit(".", 1)[1])


class Group:
    def __init__(self, plan, rank: int, ctx: zmq.Context, timeout: float):
        self.rank = rank
        self.world = plan.tp_world
        self.device = torch.device(plan.tensor_parallel_devices[rank])
        self.inbox = None
        self.peers: list[Channel] = []
        if rank > 0:  # bound before the rendezvous, so rank 0 never pushes to an absent socket
            sock = ctx.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(plan.endpoint(f"tp.{rank}.sock"))
            self.inbox = Channel(sock, GroupInbox)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            init_method=f"file://{os.environ[TP_STORE_ENV]}",
            rank=rank,
            world_size=self.world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        if rank == 0:
            for peer in range(1, self.world):
                sock = ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 1000)  # GroupStop must reach them
                sock.setsockopt(zmq.SNDHWM, 0)  # never drop: a lost message would desynchronize the group
                sock.connect(plan.endpoint(f"tp.{peer}.sock"))
                self.peers.append(Channel(sock, GroupInbox))

    def share(self, msg: Message, frames: Sequence = ()) -> None:
        """Rank 0: the same computation, to every other rank."""
        for peer in self.peers:
            peer.send(msg, frames)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def close(self) -> None:
        for channel in self.peers + ([self.inbox] if self.inbox else []):
            channel.sock.close()
        try:
            dist.destroy_process_group()
        except Exception:
            pass  # a broken group (a peer died) cannot be torn down politely; exiting frees it
