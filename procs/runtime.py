"""The block runtime: the node's blocks on one device, their attention caches, and the work queue.

Owns: the weights of blocks [start_block, end_block), the K/V tensors of every open session (by
  cache handle), and a priority queue of work (inference first, then forward and backward).
Receives (ROUTER `runtime.sock`): Forward, Backward, InferStep and Cancel from frontends; DropCache
  from the allocator. Control: LoadBlocks (the node is announced JOINING), Stop.
Sends: a Result (output tensors as raw frames) or a Failure naming what was wrong, to the sender.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import zmq

from node import compute
from node.checkpoint import Checkpoint
from node.models import get_family
from node.scheduler import Scheduler, Task
from procs import actor as actor_lib
from protocol.frames import DTYPES, FrameError, from_frames, to_frames
from protocol.messages import Backward, Cancel, DropCache, Failure, Forward, InferStep, LoadBlocks, Result, RuntimeInbox
from protocol.plan import NodePlan
from protocol.transport import BadMessage, Channel

class RequestError(ValueError):
    """The request is wrong; the message goes back to the client as is."""


@dataclass
class SessionCache:
    batch: int
    max_length: int
    start: int
    end: int
    kv: list  # one (K, V) pair per block of [start, end)
    length: int = 0  # positions [0, length) hold valid keys and values
    last_used: float = field(default_factory=time.monotonic)


def load_blocks(plan: NodePlan, log) -> tuple[list, object]:
    checkpoint = Checkpoint.open(plan.model, revision=plan.revision, token=plan.token, cache_dir=plan.cache_dir)
    config = checkpoint.config()
    family = get_family(config)
    dtype = DTYPES[plan.torch_dtype]
    blocks = []
    for index in range(plan.start_block, plan.end_block):
        began = time.perf_counter()
        state = checkpoint.block_state(f"{family.block_prefix}.{index}.", dtype=dtype, device=plan.device)
        blocks.append(family.block_class.from_state(config, state, dtype=dtype, device=plan.device))
        log.info("block loaded", block=index, seconds=round(time.perf_counter() - began, 3))
    return blocks, family


class Runtime:
    def __init__(self, actor: actor_lib.Actor, blocks: list):
        self.actor = actor
        self.plan = actor.plan
        self.log = actor.log
        self.blocks = blocks
        self.dtype = DTYPES[self.plan.torch_dtype]
        self.device = torch.device(self.plan.device)
        self.caches: dict[int, SessionCache] = {}
        self.queue = Scheduler()
        self.done = 0
        self.failed = 0
        self.busy_seconds = 0.0
        sock = actor.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted frontend reuses its identity
        sock.bind(self.plan.endpoint("runtime.sock"))
        self.inbox = Channel(sock, RuntimeInbox, router=True, observer=actor.probe.observe)

    # --- receiving ---------------------------------------------------------------------------

    def serve(self) -> None:
        self.actor.ready(blocks=[self.plan.start_block, self.plan.end_block], dtype=self.plan.torch_dtype)
        last_gc = time.monotonic()
        while not self.actor.stopping.is_set():
            self.receive(timeout_ms=0 if self.queue else 100)
            task = self.queue.pop()
            if task is not None:
                self.run(task)
            if time.monotonic() - last_gc > 10:
                self.collect_idle_caches()
                last_gc = time.monotonic()
            self.update_stats()
        self.drain()

    def receive(self, timeout_ms: int) -> None:
        """Take everything that has arrived, so the queue can order it by priority."""
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
            msg = envelope.msg
            if isinstance(msg, DropCache):
                for handle in msg.handles:
                    self.caches.pop(handle, None)
            elif isinstance(msg, Cancel):
                self.queue.cancel(envelope.sender, msg.req)
            else:
                self.queue.push(envelope.sender, msg, envelope.frames, inference=isinstance(msg, InferStep))

    def drain(self) -> None:
        """On stop: finish what is queued within the grace period, fail the rest."""
        deadline = time.monotonic() + self.actor.grace
        while (task := self.queue.pop()) is not None:
            if time.monotonic() < deadline:
                self.run(task)
            else:
                self.reply(task.sender, Failure(task.msg.req, "the server is shutting down; retry elsewhere"))

    # --- computing ---------------------------------------------------------------------------

    def run(self, task: Task) -> None:
        msg = task.msg
        began = time.perf_counter()
        try:
            if isinstance(msg, Forward):
                outputs = self.forward(msg, task.frames)
            elif isinstance(msg, Backward):
                outputs = self.backward(msg, task.frames)
            else:
                outputs = self.inference_step(msg, task.frames)
        except (RequestError, FrameError) as e:
            self.failed += 1
            self.reply(task.sender, Failure(msg.req, str(e)))
            return
        except Exception as e:  # a bug or out of memory must fail this request, not the runtime
            self.failed += 1
            self.log.exception("task failed", task=type(msg).__name__, req=msg.req)
            self.reply(task.sender, Failure(msg.req, f"{type(e).__name__}: {e}"))
            return
        finally:
            self.busy_seconds += time.perf_counter() - began
        self.done += 1
        metas, frames = to_frames(outputs)
        self.reply(task.sender, Result(msg.req, metas), frames)

    def chain(self, start: int, end: int) -> list:
        if not (self.plan.start_block <= start < end <= self.plan.end_block):
            raise RequestError(f"blocks {start}:{end} are not served here (this node serves {self.plan.start_block}:{self.plan.end_block})")
        return self.blocks[start - self.plan.start_block : end - self.plan.start_block]

    def hidden_states(self, tensor: torch.Tensor, name: str, batch: Optional[int] = None) -> torch.Tensor:
        if tensor.dim() != 3 or tensor.shape[-1] != self.plan.hidden_size:
            raise RequestError(f"{name} must have shape [batch, length, {self.plan.hidden_size}], got {list(tensor.shape)}")
        if not tensor.dtype.is_floating_point:
            raise RequestError(f"{name} must be a floating point tensor, got {tensor.dtype}")
        if batch is not None and tensor.shape[0] != batch:
            raise RequestError(f"{name} has batch size {tensor.shape[0]}, but the session was opened with {batch}")
        tensor = tensor.to(self.device, self.dtype)
        if not torch.isfinite(tensor).all():
            raise RequestError(f"{name} contain NaN or infinite values")
        return tensor

    def prompts(self, tensor: torch.Tensor, n_blocks: int, batch: int, length: int) -> Optional[torch.Tensor]:
        if tensor.numel() == 0:
            return None
        h = self.plan.hidden_size
        if tensor.dim() != 4 or tensor.shape[0] != n_blocks or tensor.shape[1] not in (1, batch) or tensor.shape[3] != h:
            raise RequestError(f"prompts must have shape [{n_blocks}, 1 or {batch}, prefix, {h}], got {list(tensor.shape)}")
        if tensor.shape[2] > length:
            raise RequestError(f"prompts cover {tensor.shape[2]} positions but the input has only {length}")
        if not tensor.dtype.is_floating_point:
            raise RequestError(f"prompts must be a floating point tensor, got {tensor.dtype}")
        tensor = tensor.to(self.device, self.dtype)
        if not torch.isfinite(tensor).all():
            raise RequestError("prompts contain NaN or infinite values")
        return tensor

    def check_size(self, hidden: torch.Tensor) -> None:
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > self.plan.max_batch_size:
            raise RequestError(f"Task size greater than max_batch_size ({tokens} > {self.plan.max_batch_size})")

    def forward(self, msg: Forward, frames: list) -> list[torch.Tensor]:
        blocks = self.chain(msg.start, msg.end)
        hidden, prompts = from_frames(msg.tensors, frames, ("hidden_states", "prompts"))
        hidden = self.hidden_states(hidden, "hidden_states")
        self.check_size(hidden)
        prompts = self.prompts(prompts, len(blocks), hidden.shape[0], hidden.shape[1])
        return [compute.forward(blocks, hidden, prompts)]

    def backward(self, msg: Backward, frames: list) -> list[torch.Tensor]:
        blocks = self.chain(msg.start, msg.end)
        inputs, grad_outputs, prompts = from_frames(msg.tensors, frames, ("inputs", "grad_outputs", "prompts"))
        inputs = self.hidden_states(inputs, "inputs")
        self.check_size(inputs)
        grad_outputs = self.hidden_states(grad_outputs, "grad_outputs")
        if grad_outputs.shape != inputs.shape:
            raise RequestError(f"grad_outputs has shape {list(grad_outputs.shape)}, expected {list(inputs.shape)} like inputs")
        prompts = self.prompts(prompts, len(blocks), inputs.shape[0], inputs.shape[1])
        grad_inputs, grad_prompts = compute.backward(blocks, inputs, grad_outputs, prompts)
        return [grad_inputs] if grad_prompts is None else [grad_inputs, grad_prompts]

    def inference_step(self, msg: InferStep, frames: list) -> list[torch.Tensor]:
        blocks = self.chain(msg.start, msg.end)
        hidden, prompts, hypo_ids = from_frames(msg.tensors, frames, ("hidden_states", "prompts", "hypo_ids"))
        cache = self.session_cache(msg, len(blocks))
        hidden = self.hidden_states(hidden, "hidden_states", cache.batch)
        self.check_size(hidden)
        length = hidden.shape[1]
        if msg.position > cache.length:
            raise RequestError(f"start_from_position {msg.position} is past the {cache.length} tokens this session holds")
        if msg.position + length > cache.max_length:
            raise RequestError(
                f"Maximum length exceeded: prefix {msg.position} + current {length} > max_length {cache.max_length}"
            )
        prompts = self.prompts(prompts, len(blocks), cache.batch, length)
        if hypo_ids.numel() == 0:
            hypo_ids = None
        else:
            if hypo_ids.dtype != torch.int64:
                raise RequestError(f"hypo_ids must be int64, got {hypo_ids.dtype}")
            if hypo_ids.shape != (cache.batch,):
                raise RequestError(f"hypo_ids must have shape [{cache.batch}], got {list(hypo_ids.shape)}")
            if hypo_ids.min() < 0 or hypo_ids.max() >= cache.batch:
                raise RequestError(f"hypo_ids must be in [0, {cache.batch}), got {hypo_ids.tolist()}")
            hypo_ids = hypo_ids.to(self.device)
        output = compute.inference_step(
            blocks, cache.kv, hidden, prompts, hypo_ids, msg.position, self.plan.max_chunk_size_bytes
        )
        cache.length = msg.position + length
        cache.last_used = time.monotonic()
        return [output]

    def session_cache(self, msg: InferStep, n_blocks: int) -> SessionCache:
        cache = self.caches.get(msg.handle)
        if cache is not None:
            if (cache.start, cache.end) != (msg.start, msg.end):
                raise RequestError(f"this session serves blocks {cache.start}:{cache.end}, not {msg.start}:{msg.end}")
            return cache
        if msg.position != 0:
            raise RequestError("the attention cache of this session is gone (the server restarted); open a new session")
        kv = []
        for block in self.chain(msg.start, msg.end):
            shape = block.kv_cache_shape(msg.batch, msg.max_length)
            kv.append((torch.empty(shape, dtype=self.dtype, device=self.device), torch.empty(shape, dtype=self.dtype, device=self.device)))
        cache = SessionCache(msg.batch, msg.max_length, msg.start, msg.end, kv)
        self.caches[msg.handle] = cache
        return cache

    def collect_idle_caches(self) -> None:
        """A cache nobody stepped for longer than any session may wait is garbage (its frontend died)."""
        limit = self.plan.step_timeout + 60
        now = time.monotonic()
        idle = [h for h, c in self.caches.items() if now - c.last_used > limit]
        for handle in idle:
            del self.caches[handle]
        if idle:
            self.log.info("dropped idle caches", count=len(idle))

    # --- sending -----------------------------------------------------------------------------

    def reply(self, to: bytes, msg, frames=()) -> None:
        try:
            self.inbox.send(msg, frames, to=to)
        except zmq.ZMQError as e:
            self.log.info("reply undeliverable", error=str(e))

    def update_stats(self) -> None:
        self.actor.stats.update(
            queue=len(self.queue),
            sessions=len(self.caches),
            done=self.done,
            failed=self.failed,
            busy_seconds=round(self.busy_seconds, 3),
        )
        self.actor.publish_stats()


def wait_for_load_order(actor: actor_lib.Actor) -> bool:
    """Blocks load only once the swarm sees us JOINING (PROTOCOL 2.4); imports are done meanwhile."""
    while not actor.stopping.is_set():
        try:
            if isinstance(actor.control_inbox.get(timeout=0.1), LoadBlocks):
                return True
        except queue.Empty:
            continue
    return False


def main(actor: actor_lib.Actor) -> None:
    torch.set_grad_enabled(False)
    if not wait_for_load_order(actor):
        return
    began = time.perf_counter()
    try:
        blocks, _ = load_blocks(actor.plan, actor.log)
    except Exception as e:
        actor.log.exception("cannot load blocks")
        actor.fatal(f"cannot load blocks {actor.plan.start_block}:{actor.plan.end_block} of {actor.plan.model}: {e}")
        return
    actor.log.info("blocks loaded", seconds=round(time.perf_counter() - began, 2), count=len(blocks))
    Runtime(actor, blocks).serve()


if __name__ == "__main__":
    actor_lib.run(main)
