"""The block runtime process: the engine of node/runtime/engine.py behind the node's runtime socket.

Owns: the ROUTER `runtime.sock` and the engine (the node's blocks on one device, their attention caches,
  the queue of work, the rounds: node/runtime/engine.py says how work is scheduled).
Receives (ROUTER `runtime.sock`): Forward, Backward, InferStep and Cancel from frontends; DropCache
  from the allocator. Control: LoadBlocks (the node is announced JOINING; while serving: load these
  beside the current ones), Serve (the announced range), DropBlocks (keep only these), Stop.
Sends: a Result (output tensors as raw frames) or a Failure naming what was wrong, to the sender;
  Measured before loading and BlocksLoaded after a load while serving, to the supervisor. With
  tensor parallelism this is rank 0: before each computation the engine pushes it to the other ranks
  (procs/runtime_rank.py, node/runtime/tensor_parallel/group.py), which compute their shards of it in step.
"""

from __future__ import annotations

from node import startup

startup.die_with_supervisor()
startup.runtime_imports()  # before the imports below: see node/startup.py

import os
import time
from typing import Optional

import torch
import zmq

from node import logs
from node.host_memory import Trimmer, hold_freed_memory
from node.runtime import linear, lora
from node.runtime.engine import Engine, GroupBroken, Step
from node.runtime.loading import load_adapters
from node.runtime.models import get_family
from node.runtime.quantize import QuantizationUnavailable, check_quantization, quantize_block
from node.runtime.tensor_parallel.group import Group
from node.weights.checkpoint import Checkpoint
from procs import actor as actor_lib
from procs.runtime_start import load_or_fail, wait_for_load_order
from protocol.frames import DTYPES
from protocol.messages import RuntimeInbox, RuntimeReady
from protocol.transport import BadMessage

MEMORY_CHECK_PERIOD = 1.0  # seconds; the supervisor decides from the free memory whether a move can load first


class RuntimeProcess:
    """Moves messages between the runtime socket, the control plane and the engine; decides nothing."""

    def __init__(self, actor: actor_lib.Actor, blocks: dict, group: Optional[Group] = None):
        self.actor = actor
        self.log = actor.log
        self.group = group
        self.inbox = actor.bind_inbox(actor.ctx, "runtime", RuntimeInbox)
        self.engine = Engine(
            actor.plan,
            blocks,
            actor.log,
            reply=self.reply,
            share=group.share if group is not None else None,
            on_round=self.publish_round,
        )
        self.free_memory: Optional[int] = None
        self.memory_checked = 0.0
        hold_freed_memory()  # after loading: what the load freed went back as it was freed
        self.trimmer = Trimmer()  # what a request freed goes back to the system once the runtime is idle

    def serve(self) -> None:
        plan = self.actor.plan
        self.actor.ready(RuntimeReady(blocks=(plan.start_block, plan.end_block), dtype=plan.torch_dtype))
        engine = self.engine
        while not self.actor.stopping.is_set():
            self.receive(timeout_ms=0 if engine.busy else 100)
            self.wait_for_stragglers()
            engine.work()
            self.trimmer.tick(engine.busy, engine.counts.done + engine.counts.failed)
            engine.drop_idle_caches()
            self.handle_control()
            self.update_stats()
        engine.drain(self.actor.grace)

    # --- receiving ---------------------------------------------------------------------------

    def receive(self, timeout_ms: int) -> None:
        """Take everything that has arrived, so that a round sees all the work that is ready."""
        if not self.inbox.sock.poll(timeout_ms):
            return
        while True:
            try:
                envelope = self.inbox.recv_nowait()
            except BadMessage as e:
                self.log.warning("bad message", reason=e.reason)
                continue
            if envelope is None:
                return
            self.engine.take(envelope.sender, envelope.msg, envelope.frames)

    def wait_for_stragglers(self) -> None:
        """Receive until the sessions of the last round are all back, or the engine's gathering deadline."""
        deadline = self.engine.gather_deadline()
        while deadline is not None and self.engine.stragglers():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.receive(timeout_ms=max(1, int(left * 1000)))

    def handle_control(self) -> None:
        loaded = self.engine.loaded()
        if loaded is not None:
            self.actor.send_control(loaded)
        while not self.actor.control_inbox.empty():
            for answer in self.engine.control(self.actor.control_inbox.get_nowait()):
                self.actor.send_control(answer)

    # --- sending -----------------------------------------------------------------------------

    def reply(self, to: bytes, msg, frames=()) -> None:
        try:
            self.inbox.send(msg, frames, to=to)
        except zmq.ZMQError as e:
            self.log.info("reply undeliverable", error=str(e))

    def publish_round(self, steps: list[Step]) -> None:
        if self.actor.probe.active:  # for `node.probe --follow`: when each step's compute began
            self.actor.probe.publish(
                "run",
                "Round",
                fields={"steps": [[s.task.sender.decode(errors="replace"), s.task.msg.req] for s in steps]},
            )

    def update_stats(self) -> None:
        now = time.monotonic()
        if now - self.memory_checked > MEMORY_CHECK_PERIOD:
            from node.runtime.capacity import device_memory

            self.free_memory = device_memory(self.engine.target.device)[1]
            self.memory_checked = now
        self.actor.stats = self.engine.stats(self.free_memory)
        self.actor.publish_stats()


def report_capacity(actor: actor_lib.Actor) -> bool:
    """Tell the supervisor what the device holds and how fast a block runs on it (it chooses the
    number of blocks and the announced throughput from this) while the announcer joins the swarm."""
    from node.runtime import capacity

    plan = actor.plan
    try:
        check_quantization(plan.quant_type, DTYPES[plan.torch_dtype], plan.device)
    except QuantizationUnavailable as e:
        actor.log.warning("quantization unavailable; serving unquantized", quant_type=plan.quant_type, error=str(e))
        plan.quant_type = "none"
    try:
        config = Checkpoint.of(plan).config()
        dtype = DTYPES[plan.torch_dtype]
        family = get_family(config)
        # adapters are fetched and tried on an empty block 0 now, so that a wrong one stops the node
        # before it joins; what they add to that block counts in each block's memory (PROTOCOL 5.3)
        with torch.device("meta"):
            empty = family.block_class(config)
        adapter_params = lora.attach(empty, 0, family.block_prefix, load_adapters(plan), dtype, "meta")
        report = capacity.measure(
            plan,
            family.block_class,
            config,
            log=actor.log,
            prepare=lambda block: quantize_block(block, plan.quant_type, dtype),
        )
        report.adapter_bytes = adapter_params * dtype.itemsize
    except lora.AdapterError as e:
        actor.fatal(str(e))
        return False
    except Exception as e:
        actor.log.exception("cannot measure the device")
        actor.fatal(f"cannot measure {plan.device} for {plan.model}: {e}")
        return False
    actor.send_control(report)
    return True


def join_group(actor: actor_lib.Actor) -> Optional[Group]:
    """With --tensor_parallel_devices: meet the other ranks (they start loading as we do)."""
    if actor.plan.tp_world == 1:
        return None
    group = Group(actor.plan, 0, actor.ctx, timeout=max(60.0, actor.plan.request_timeout))
    actor.log.info("tensor-parallel group formed", world=group.world, devices=actor.plan.tensor_parallel_devices)
    return group


def main(actor: actor_lib.Actor) -> None:
    torch.set_grad_enabled(False)
    logs.route_transformers_logs()
    if actor.plan.device.startswith("cuda:"):
        # the current device is where kernels, caches and synchronizations go by default: the plan's GPU, not
        # GPU 0 (whose context a neighbouring node would see in use)
        torch.cuda.set_device(torch.device(actor.plan.device))
    if not report_capacity(actor):
        return
    # the products a crashed predecessor timed (node/runtime/linear.py)
    linear.remember(os.path.join(actor.plan.run_dir, "linear_choices.json"))
    if not wait_for_load_order(actor):
        return
    began = time.perf_counter()
    group = join_group(actor)
    blocks = load_or_fail(actor, group, began)
    if blocks is None:
        return
    try:
        RuntimeProcess(actor, blocks, group).serve()
    except GroupBroken as e:
        actor.log.error("tensor-parallel group broken; exiting so that the supervisor restarts it", error=str(e))
        time.sleep(0.2)  # let the failures just sent reach the frontends
        raise  # without tearing the group down: with a peer gone that could wait forever
    if group is not None:
        group.close()


if __name__ == "__main__":
    actor_lib.run(main)
