"""The block runtime: the node's blocks on one device, their attention caches, and the work.

Owns: the weights of blocks [start_block, end_block), the K/V tensors of every open session (by
  cache handle), the queue of work and the inference steps in progress.
Receives (ROUTER `runtime.sock`): Forward, Backward, InferStep and Cancel from frontends; DropCache
  from the allocator. Control: LoadBlocks (the node is announced JOINING; while serving: load these
  beside the current ones), Serve (the announced range), DropBlocks (keep only these), Stop.
Sends: a Result (output tensors as raw frames) or a Failure naming what was wrong, to the sender;
  Measured before loading and BlocksLoaded after a load while serving, to the supervisor. With
  tensor parallelism this is rank 0: before each computation it pushes it to the other ranks
  (procs/runtime_rank.py, node/runtime/tensor_parallel/group.py), which compute their shards of it in step.

Work runs in rounds. An inference round takes the sessions' ready steps (up to INFERENCE_ROUND_TOKENS,
each peer in turn: node/runtime/scheduler.py) and runs them through the blocks together (one matrix
multiplication per weight for all their tokens); a long prefill goes in chunks of PREFILL_CHUNK tokens,
one per round, so that it cannot hold up everyone's next token for long. Forward and backward requests
run when no inference step is ready: forwards merged up to --max_batch_size tokens and taken through
their blocks in rounds of at most --max_batch_size tokens x blocks, backwards one at a time. The queue
is bounded: work that does not fit is refused at once.
"""

from __future__ import annotations

from node import startup

startup.die_with_supervisor()
startup.runtime_imports()  # before the imports below: see node/startup.py

import time
from dataclasses import dataclass, field
from typing import Optional

import msgspec
import torch
import zmq

from node import logs
from node.runtime import checks, compute, lora
from node.runtime.checks import RequestError, Target
from node.runtime.kv_cache import CacheMissing, SessionCache, SessionCaches
from node.runtime.loading import BlockLoader, load_adapters, load_or_fail, wait_for_load_order
from node.runtime.models import get_family
from node.runtime.quantize import QuantizationUnavailable, check_quantization, quantize_block
from node.runtime.scheduler import QueueFull, Scheduler, Task, tokens
from node.runtime.tensor_parallel.group import Group
from node.weights.checkpoint import Checkpoint
from procs import actor as actor_lib
from protocol.frames import DTYPES, FrameError, from_frames, to_frames
from protocol.messages import (
    SHUTTING_DOWN,
    Backward,
    BlocksLoaded,
    Cancel,
    DropBlocks,
    DropCache,
    Failure,
    Forward,
    GroupBackward,
    GroupDrop,
    GroupRun,
    GroupStop,
    InferStep,
    LoadBlocks,
    Result,
    RuntimeInbox,
    RuntimeReady,
    RuntimeStats,
    Serve,
    ShardWork,
)
from protocol.transport import BadMessage, Channel

PREFILL_CHUNK = 256  # tokens of one session's step per round
INFERENCE_ROUND_TOKENS = 4 * PREFILL_CHUNK  # tokens of all sessions in one round: more wait a round, peers in turn
MAX_GATHER_WAIT = 0.1  # seconds a round may wait for the sessions of the previous round


def step_cost(batch: int, length: int) -> int:
    """Tokens a step puts into one round: at most PREFILL_CHUNK (a longer prefill takes more rounds)."""
    return batch * min(length, max(1, PREFILL_CHUNK // batch))


def task_cost(task: Task) -> int:
    shape = task.msg.tensors[0].shape if task.msg.tensors else ()
    return step_cost(shape[0], shape[1]) if len(shape) >= 2 else 1


@dataclass
class Step:
    """An inference step in progress: validated inputs and how far it has got."""

    task: Task
    cache: SessionCache
    hidden: torch.Tensor  # [B, T, H]
    prompts: Optional[torch.Tensor]
    position: int
    first: int  # index of its first block in the runtime's blocks
    done: int = 0  # tokens (along T) already processed
    outputs: list = field(default_factory=list)
    # beam search's reordering; with a group it is applied by all ranks just before the first chunk runs
    hypo_ids: Optional[torch.Tensor] = None


@dataclass
class Forwarding:
    """A forward request on its way through its blocks, some blocks per round."""

    task: Task
    work: compute.Work  # the whole request: its first block, how many, its input, its prompts
    passed: int = 0  # blocks done
    hidden: Optional[torch.Tensor] = None  # the output of the last block done
    rounds: int = 0  # rounds it took part in

    @property
    def tokens(self) -> int:
        return self.work.hidden.shape[0] * self.work.hidden.shape[1]

    def next_chunk(self, blocks: int) -> compute.Work:
        w = self.work
        n = min(blocks, w.n_blocks - self.passed)
        prompts = None if w.prompts is None else w.prompts[self.passed : self.passed + n]
        hidden = w.hidden if self.hidden is None else self.hidden
        return compute.Work(w.first + self.passed, n, hidden, prompts=prompts)

    def advance(self, blocks: int, output: torch.Tensor) -> None:
        self.passed += blocks
        self.hidden = output
        self.rounds += 1

    @property
    def done(self) -> bool:
        return self.passed >= self.work.n_blocks


class GroupBroken(Exception):
    """A computation failed after the other ranks were told to run it: their reductions no longer pair
    up with ours, so the group must restart (the supervisor does it when this process exits)."""


class Runtime:
    def __init__(self, actor: actor_lib.Actor, blocks: dict, group: Optional[Group] = None):
        self.actor = actor
        self.group = group  # tensor parallelism: we lead it
        self.plan = actor.plan
        self.log = actor.log
        # indexed by global block index; None where not held. A move may hold two ranges for a while:
        # the announced one (plan.start_block:end_block) and the one its open sessions still use.
        self.blocks: list = [None] * self.plan.total_blocks
        for index, block in blocks.items():
            self.blocks[index] = block
        self.loading: Optional[BlockLoader] = None
        self.memory_checked = 0.0
        self.target = Target(DTYPES[self.plan.torch_dtype], torch.device(self.plan.device))
        self.caches = SessionCaches(self.target.dtype, self.target.device)
        self.queue = Scheduler(
            is_inference=lambda m: isinstance(m, InferStep), is_forward=lambda m: isinstance(m, Forward)
        )
        self.steps: list[Step] = []  # inference steps in progress (chunked prefills span rounds)
        self.forwards: list[Forwarding] = []  # forwards in progress (long ones span rounds)
        self.forward_turn: dict[str, None] = {}  # peers in the order their forwards advance next
        self.last_handles: set[int] = set()  # the sessions of the last inference round
        self.last_round_seconds = 0.0
        self.counts = RuntimeStats()  # the counters; update_stats adds the gauges and sends a copy
        self.free_memory: Optional[int] = None
        sock = actor.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted frontend reuses its identity
        sock.bind(self.plan.endpoint("runtime.sock"))
        self.inbox = Channel(sock, RuntimeInbox, router=True, observer=actor.probe.observe)

    # --- receiving ---------------------------------------------------------------------------

    def serve(self) -> None:
        self.actor.ready(RuntimeReady(blocks=(self.plan.start_block, self.plan.end_block), dtype=self.plan.torch_dtype))
        last_gc = time.monotonic()
        while not self.actor.stopping.is_set():
            self.receive(timeout_ms=0 if (self.queue or self.steps or self.forwards) else 100)
            self.wait_for_stragglers()
            if not self.inference_round():
                self.training_round()
            if time.monotonic() - last_gc > 10:
                idle = self.caches.idle(self.plan.step_timeout + 60)
                if idle:  # their frontend died without the allocator noticing
                    self.drop_caches(idle)
                    self.log.info("dropped idle caches", count=len(idle))
                last_gc = time.monotonic()
            self.handle_control()
            self.update_stats()
        self.drain()

    def handle_control(self) -> None:
        """A move without downtime: load the new blocks beside the old ones, serve both while the
        old sessions finish, then drop what is no longer served (PROTOCOL 5.1, node/supervisor/placement.py)."""
        if self.loading is not None and self.loading.done.is_set():
            loader, self.loading = self.loading, None
            if loader.error is not None:
                self.log.error("cannot load the new blocks", blocks=list(loader.span), error=loader.error)
                self.actor.send_control(BlocksLoaded(*loader.span, ok=False, error=loader.error))
            else:
                for index, block in loader.blocks.items():
                    self.blocks[index] = block
                self.actor.send_control(BlocksLoaded(*loader.span))
        while not self.actor.control_inbox.empty():
            msg = self.actor.control_inbox.get_nowait()
            if isinstance(msg, LoadBlocks) and self.group is not None:
                self.log.warning("a group cannot load blocks while serving; the supervisor restarts it instead")
                self.actor.send_control(
                    BlocksLoaded(msg.start_block, msg.end_block, ok=False, error="tensor-parallel group")
                )
            elif isinstance(msg, LoadBlocks) and self.loading is None:
                missing = [i for i in range(msg.start_block, msg.end_block) if self.blocks[i] is None]
                self.loading = BlockLoader(self.plan, self.log, (msg.start_block, msg.end_block), missing)
            elif isinstance(msg, Serve):
                self.plan.start_block, self.plan.end_block = msg.start_block, msg.end_block
            elif isinstance(msg, DropBlocks):
                kept = range(msg.start_block, msg.end_block)
                dropped = [i for i, b in enumerate(self.blocks) if b is not None and i not in kept]
                for i in dropped:
                    self.blocks[i] = None
                self.drop_caches(
                    [h for h, c in self.caches.items() if c.start < msg.start_block or c.end > msg.end_block]
                )
                self.log.info("blocks dropped", dropped=dropped, kept=[msg.start_block, msg.end_block])

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
            msg = envelope.msg
            if isinstance(msg, DropCache):
                self.drop_caches(msg.handles)
            elif isinstance(msg, Cancel):
                if not self.queue.cancel(envelope.sender, msg.req):
                    self.steps = [s for s in self.steps if s.task.key != (envelope.sender, msg.req)]
            else:
                try:
                    self.queue.push(envelope.sender, msg, envelope.frames)
                except QueueFull as e:
                    self.counts.refused["queue"] = self.counts.refused.get("queue", 0) + 1
                    self.log.info("refused", reason="queue", peer=getattr(msg, "peer", ""), detail=str(e))
                    self.reply(envelope.sender, Failure(msg.req, str(e)))

    def drain(self) -> None:
        """On stop: finish what is under way within the grace period, fail the rest."""
        deadline = time.monotonic() + self.actor.grace
        while (self.queue or self.steps or self.forwards) and time.monotonic() < deadline:
            if not self.inference_round():
                self.training_round()
        unfinished = [s.task for s in self.steps] + [f.task for f in self.forwards]
        for task in unfinished + self.queue.inference + self.queue.training:
            self.reply(task.sender, Failure(task.msg.req, SHUTTING_DOWN, restarting=True))
        if self.group is not None:
            self.group.share(GroupStop())

    def drop_caches(self, handles) -> None:
        handles = list(handles)
        self.caches.drop(handles)
        if self.group is not None and handles:
            self.group.share(GroupDrop(handles))

    # --- inference rounds --------------------------------------------------------------------

    def wait_for_stragglers(self) -> None:
        """Sessions of the last round whose next step is not here yet usually are a few milliseconds
        away (their clients are busy with the previous token). Starting without them would cost them
        a whole extra pass over the weights, so wait a little: at most one round's time, at most
        MAX_GATHER_WAIT, and only while some of them are missing."""
        if not self.last_handles or not self.queue.inference:
            return
        deadline = time.monotonic() + min(MAX_GATHER_WAIT, 0.5 * self.last_round_seconds)
        while True:
            ready = {t.msg.handle for t in self.queue.inference} | {s.task.msg.handle for s in self.steps}
            missing = [h for h in self.last_handles if h not in ready and h in self.caches.caches]
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                return
            self.receive(timeout_ms=max(1, int(left * 1000)))

    def inference_round(self) -> bool:
        busy = {s.task.msg.handle for s in self.steps}
        under_way = sum(step_cost(s.hidden.shape[0], s.hidden.shape[1] - s.done) for s in self.steps)
        room = INFERENCE_ROUND_TOKENS - under_way
        for task in self.queue.take_inference(busy, max_tokens=max(0, room), cost=task_cost):
            step = self.guard(task, self.admit)
            if step is not None:
                self.steps.append(step)
        self.steps = [s for s in self.steps if not self.finish_if_done(s)]
        if not self.steps:
            return False
        works, began = [], time.perf_counter()
        self.last_handles = {step.task.msg.handle for step in self.steps}
        for step in self.steps:
            batch, length = step.hidden.shape[:2]
            take = min(length - step.done, max(1, PREFILL_CHUNK // batch))
            chunk = step.hidden[:, step.done : step.done + take]
            prompts = None
            if step.prompts is not None and step.done < step.prompts.shape[2]:
                prompts = step.prompts[:, :, step.done : step.done + take]
            works.append(
                compute.Work(
                    step.first, len(step.cache.kv), chunk, step.cache.kv, step.position + step.done, prompts, step=step
                )
            )
        if self.actor.probe.active:  # for `node.probe --follow`: when each step's compute began
            self.actor.probe.publish(
                "run",
                "Round",
                fields={"steps": [[s.task.sender.decode(errors="replace"), s.task.msg.req] for s in self.steps]},
            )
        try:
            outputs = self.run(works, [step.task.msg.adapter for step in self.steps])
        except Exception as e:  # out of memory or a bug: fail this round's steps, keep serving
            self.log.exception("inference round failed", sessions=len(self.steps))
            for step in self.steps:
                self.fail(step.task, self.retryable(e), restarting=self.group is not None)
            self.steps = []
            self.break_group(e)
            return True
        for step, work, output in zip(self.steps, works, outputs):
            step.outputs.append(output)
            step.done += work.hidden.shape[1]
            step.cache.length = step.position + step.done
            step.cache.last_used = time.monotonic()
        self.count_round(works, began)
        self.last_round_seconds = time.perf_counter() - began
        self.steps = [s for s in self.steps if not self.finish_if_done(s)]
        return True

    def run(self, works: list, adapters: list[str]) -> list[torch.Tensor]:
        """Works through the blocks together, except that each adapter (or none) gets its own batch:
        a batch computes with one adapter active, so no request sees another's."""
        outputs: list = [None] * len(works)
        for adapter in dict.fromkeys(adapters):
            chosen = [i for i, a in enumerate(adapters) if a == adapter]
            if self.group is not None:
                self.share_run([works[i] for i in chosen], adapter)
            with lora.activate(adapter):
                for i, out in zip(
                    chosen, compute.run(self.blocks, [works[i] for i in chosen], self.plan.max_chunk_size_bytes)
                ):
                    outputs[i] = out
        return outputs

    def admit(self, task: Task) -> Step:
        msg: InferStep = task.msg
        first, n_blocks = self.block_range(msg.start, msg.end)
        hidden, prompts, hypo_ids = from_frames(msg.tensors, task.frames, ("hidden_states", "prompts", "hypo_ids"))
        cache = self.caches.get(
            msg.handle,
            msg.batch,
            msg.max_length,
            msg.start,
            msg.end,
            msg.position,
            self.blocks[first : first + n_blocks],
        )
        checks.position(msg.position, cache.length)
        hidden = checks.finite(hidden, "hidden_states", self.target)
        prompts = checks.prompts(prompts, self.target)
        hypo_ids = checks.hypo_ids(hypo_ids, cache.batch, self.target)
        if hypo_ids is not None and self.group is None:
            compute.reorder_cache(cache.kv, hypo_ids)
            hypo_ids = None
        cache.length = msg.position  # a rollback forgets what came after
        return Step(task, cache, hidden, prompts, msg.position, first, hypo_ids=hypo_ids)

    def finish_if_done(self, step: Step) -> bool:
        if step.done < step.hidden.shape[1]:
            return False
        output = torch.cat(step.outputs, dim=1) if step.outputs else step.hidden
        self.succeed(step.task, [output])
        return True

    # --- forward and backward ----------------------------------------------------------------

    def training_round(self) -> None:
        """Forwards go through their blocks in rounds of about --max_batch_size tokens x blocks (small ones
        in one round, the largest one block per round, the least advanced first), new ones join at every
        round, so that neither inference rounds nor another peer's forwards wait for a long one; a backward
        runs alone."""
        limit = self.plan.max_batch_size
        room = 2 * limit - sum(f.tokens for f in self.forwards)
        if room > 0 or not self.forwards:
            tasks = self.queue.take_training(room)
        else:  # full, but a peer with nothing under way gets in: another's long forwards do not block it
            tasks = self.queue.take_training_for_newcomers({f.task.peer for f in self.forwards})
        if tasks and isinstance(tasks[0].msg, Backward):
            began = time.perf_counter()
            outputs = self.guard(tasks[0], self.backward)
            if outputs is not None:
                self.succeed(tasks[0], outputs)
            self.counts.busy_seconds += time.perf_counter() - began
            return
        prepared = [(task, self.guard(task, self.prepare_forward)) for task in tasks]
        self.forwards += [Forwarding(task, work) for task, work in prepared if work is not None]
        if not self.forwards:
            return
        began = time.perf_counter()
        chosen, works, budget = [], [], limit
        turn = {peer: i for i, peer in enumerate(self.forward_turn)}
        for f in sorted(self.forwards, key=lambda f: (turn.get(f.task.peer, -1), f.rounds)):
            if budget <= 0:  # peers in turn, each one's least advanced first; the rest waits a round
                break
            blocks = max(1, budget // f.tokens)  # at least one block each: a round is at most twice the budget
            works.append(f.next_chunk(blocks))
            chosen.append(f)
            budget -= works[-1].n_blocks * f.tokens
        try:
            outputs = self.run(works, [f.task.msg.adapter for f in chosen])
        except Exception as e:
            self.log.exception("forward batch failed", requests=len(self.forwards))
            for f in self.forwards:
                self.fail(f.task, self.retryable(e), restarting=self.group is not None)
            self.forwards = []
            self.break_group(e)
            return
        for f in chosen:  # served peers go to the end of the turn
            self.forward_turn.pop(f.task.peer, None)
            self.forward_turn[f.task.peer] = None
        for f, work, output in zip(chosen, works, outputs):
            f.advance(work.n_blocks, output)
            if f.done:
                self.succeed(f.task, [output])
        self.forwards = [f for f in self.forwards if not f.done]
        active = {f.task.peer for f in self.forwards}
        self.forward_turn = {peer: None for peer in self.forward_turn if peer in active}
        self.count_round(works, began)

    def prepare_forward(self, task: Task) -> compute.Work:
        msg: Forward = task.msg
        first, n_blocks = self.block_range(msg.start, msg.end)
        hidden, prompts = from_frames(msg.tensors, task.frames, ("hidden_states", "prompts"))
        hidden = checks.finite(hidden, "hidden_states", self.target)
        return compute.Work(first, n_blocks, hidden, prompts=checks.prompts(prompts, self.target))

    def backward(self, task: Task) -> list[torch.Tensor]:
        msg: Backward = task.msg
        first, n_blocks = self.block_range(msg.start, msg.end)
        tensors = from_frames(msg.tensors, task.frames, ("inputs", "grad_outputs", "prompts"))
        x = checks.finite(tensors[0], "inputs", self.target)
        grad_outputs = checks.finite(tensors[1], "grad_outputs", self.target)
        prompts = checks.prompts(tensors[2], self.target)
        if self.group is not None:
            shared = [x, grad_outputs, prompts if prompts is not None else torch.empty(0)]
            metas, frames = to_frames(shared)
            self.group.share(GroupBackward(first, n_blocks, metas, msg.adapter), frames)
        try:
            with lora.activate(msg.adapter):
                grad_inputs, grad_prompts = compute.backward(
                    self.blocks[first : first + n_blocks], x, grad_outputs, prompts
                )
        except Exception as e:
            self.log.exception("backward failed", req=msg.req)
            self.fail(task, self.retryable(e), restarting=self.group is not None)
            self.break_group(e)
            return None
        return [grad_inputs] if grad_prompts is None else [grad_inputs, grad_prompts]

    def block_range(self, start: int, end: int) -> tuple[int, int]:
        """The request's blocks as (index of the first in self.blocks, count)."""
        if not (0 <= start < end <= len(self.blocks)) or any(b is None for b in self.blocks[start:end]):
            raise RequestError(
                f"blocks {start}:{end} are not served here "
                f"(this node serves {self.plan.start_block}:{self.plan.end_block})"
            )
        return start, end - start

    # --- the tensor-parallel group ------------------------------------------------------------

    def share_run(self, works: list, adapter: str) -> None:
        """Tell the other ranks to run these works (caches by handle, made on first sight)."""
        shard_works, tensors = [], []
        for work in works:
            step: Optional[Step] = work.step
            tensors.append(work.hidden)
            if work.prompts is not None:
                tensors.append(work.prompts)
            if step is None:
                shard_works.append(
                    ShardWork(work.first, work.n_blocks, work.past, -1, prompts=work.prompts is not None)
                )
                continue
            cache, reorder = step.cache, step.hypo_ids
            if reorder is not None:
                compute.reorder_cache(cache.kv, reorder)
                tensors.append(reorder)
                step.hypo_ids = None
            shard_works.append(
                ShardWork(
                    work.first,
                    work.n_blocks,
                    work.past,
                    step.task.msg.handle,
                    cache.batch,
                    cache.max_length,
                    cache.start,
                    cache.end,
                    prompts=work.prompts is not None,
                    hypo_ids=reorder is not None,
                )
            )
        metas, frames = to_frames(tensors)
        self.group.share(GroupRun(shard_works, metas, adapter), frames)

    def retryable(self, e: Exception) -> str:
        if self.group is None:
            return f"{type(e).__name__}: {e}"
        return f"the server's tensor-parallel group failed and restarts ({type(e).__name__}: {e}); retry"

    def break_group(self, e: Exception) -> None:
        if self.group is not None:
            raise GroupBroken(f"{type(e).__name__}: {e}") from e

    # --- sending -----------------------------------------------------------------------------

    def guard(self, task: Task, prepare):
        """Run `prepare(task)`; a bad request (or a bug) is answered with a Failure and gives None."""
        try:
            return prepare(task)
        except GroupBroken:
            raise
        except CacheMissing as e:
            self.counts.failed += 1
            self.reply(task.sender, Failure(task.msg.req, str(e), cache_missing=True))
        except (RequestError, FrameError) as e:
            self.fail(task, str(e))
        except Exception as e:  # a bug or out of memory must fail this request, not the runtime
            self.log.exception("task failed", task=type(task.msg).__name__, req=task.msg.req)
            self.fail(task, f"{type(e).__name__}: {e}")
        return None

    def succeed(self, task: Task, outputs: list[torch.Tensor]) -> None:
        self.counts.done += 1
        self.counts.tokens += tokens(task)
        metas, frames = to_frames(outputs)
        self.reply(task.sender, Result(task.msg.req, metas), frames)

    def fail(self, task: Task, error: str, restarting: bool = False) -> None:
        self.counts.failed += 1
        self.reply(task.sender, Failure(task.msg.req, error, restarting))

    def reply(self, to: bytes, msg, frames=()) -> None:
        try:
            self.inbox.send(msg, frames, to=to)
        except zmq.ZMQError as e:
            self.log.info("reply undeliverable", error=str(e))

    def count_round(self, works: list, began: float) -> None:
        counts = self.counts
        counts.rounds += 1
        counts.round_sessions = len(works)
        counts.round_sizes[str(len(works))] = counts.round_sizes.get(str(len(works)), 0) + 1
        counts.round_tokens = sum(w.hidden.shape[0] * w.hidden.shape[1] for w in works)
        counts.busy_seconds += time.perf_counter() - began

    def update_stats(self) -> None:
        now = time.monotonic()
        if now - self.memory_checked > 1.0:  # the supervisor decides from it whether a move can load first
            from node.runtime.capacity import device_memory

            self.free_memory = device_memory(self.target.device)[1]
            self.memory_checked = now
        outside = sum(
            1 for _, c in self.caches.items() if c.start < self.plan.start_block or c.end > self.plan.end_block
        )
        self.actor.stats = msgspec.structs.replace(
            self.counts,
            busy_seconds=round(self.counts.busy_seconds, 3),
            round_sizes=dict(self.counts.round_sizes),
            queue=len(self.queue),
            in_progress=len(self.steps) + len(self.forwards),
            sessions=len(self.caches),
            blocks_held=sum(b is not None for b in self.blocks),
            sessions_outside=outside,
            free_memory=self.free_memory,
        )
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
    if not wait_for_load_order(actor):
        return
    began = time.perf_counter()
    group = join_group(actor)
    blocks = load_or_fail(actor, group, began)
    if blocks is None:
        return
    try:
        Runtime(actor, blocks, group).serve()
    except GroupBroken as e:
        actor.log.error("tensor-parallel group broken; exiting so that the supervisor restarts it", error=str(e))
        time.sleep(0.2)  # let the failures just sent reach the frontends
        raise  # without tearing the group down: with a peer gone that could wait forever
    if group is not None:
        group.close()


if __name__ == "__main__":
    actor_lib.run(main)
