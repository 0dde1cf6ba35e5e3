"""The block runtime's engine: its blocks, their attention caches, the queue of work and the rounds.

No sockets and no process: messages come in through `take`, answers go out through the `reply` callable
the owner gives (procs/runtime.py sends them on its ROUTER; a test collects them), and with tensor
parallelism each computation is first handed to `share` (the group's push to the other ranks). So the
engine runs in-process in a test: tests/unit/test_engine.py drives it with random blocks.

Work runs in rounds (`work`). An inference round takes the sessions' ready steps (up to
INFERENCE_ROUND_TOKENS, each peer in turn: node/runtime/scheduler.py) and runs them through the blocks
together (one matrix multiplication per weight for all their tokens); a long prefill goes in chunks of
PREFILL_CHUNK tokens, one per round, so that it cannot hold up everyone's next token for long (alone on
the runtime, in chunks of LONE_CHUNK). Forward and backward requests run when no inference step is
ready: forwards merged up to --max_batch_size tokens and taken through their blocks in rounds of at most
--max_batch_size tokens x blocks, backwards one at a time. The queue is bounded: work that does not fit is
refused at once.

A move without downtime (PROTOCOL 5.1, node/supervisor/placement.py) is three orders (`control`): load
the new blocks beside the old ones (on a thread: `loaded` says when they are in), serve the new range,
then drop what is no longer served once the old sessions are done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import msgspec
import torch

from node.runtime import checks, compute, lora
from node.runtime.checks import RequestError, Target
from node.runtime.kv_cache import CacheMissing, SessionCache, SessionCaches
from node.runtime.loading import BlockLoader
from node.runtime.scheduler import QueueFull, Scheduler, Task, tokens
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
    Message,
    Result,
    RuntimeStats,
    Serve,
    ShardWork,
)
from protocol.plan import NodePlan

# Tokens of one session's step per round. A tail stays short (513 = 256 + 256 + 1) rather than the chunks
# evened out (171 x 3): at the 8B shape on the CPU, MKL multiplies 256 rows 20% faster per row than 171,
# which costs more than the tail's round (a decode step's 21 ms a matrix pair against 200).
PREFILL_CHUNK = 256
INFERENCE_ROUND_TOKENS = 4 * PREFILL_CHUNK  # tokens of all sessions in one round: more wait a round, peers in turn
# A prefill alone on the runtime goes in chunks of up to a whole round's tokens (no memory a full round does
# not take anyway): 513 tokens in one round ran 8% faster than in three at the 8B shape on the CPU (the
# tail's extra pass over the weights, and 256-row products), which a session's rebuild after a restart pays.
LONE_CHUNK = INFERENCE_ROUND_TOKENS
MAX_GATHER_WAIT = 0.1  # seconds a round may wait for the sessions of the previous round
# Inference goes first, but not forever: once forwards or a backward have waited through this many seconds
# of inference rounds (and at least twice their last round's time, so inference keeps two thirds of a
# contended runtime), they get a round. Without it one peer's stream of prefills held every other peer's
# forwards for as long as it kept sending.
MAX_TRAINING_WAIT = 0.25
IDLE_CHECK_PERIOD = 10.0  # seconds between looks for caches nobody steps any more

Reply = Callable[[bytes, Message, Sequence], None]  # (to whom, the answer, its tensor frames)
Share = Callable[[Message, Sequence], None]  # hand a computation to the other ranks before running it


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
    first: int  # index of its first block in the engine's blocks
    done: int = 0  # tokens (along T) already processed
    outputs: list = field(default_factory=list)
    # beam search's reordering; with a group it is applied by all ranks just before the first chunk runs
    hypo_ids: Optional[torch.Tensor] = None
    compute_s: float = 0.0  # the rounds' compute it took part in (Result.compute_us)


@dataclass
class Forwarding:
    """A forward request on its way through its blocks, some blocks per round."""

    task: Task
    work: compute.Work  # the whole request: its first block, how many, its input, its prompts
    passed: int = 0  # blocks done
    hidden: Optional[torch.Tensor] = None  # the output of the last block done
    rounds: int = 0  # rounds it took part in
    compute_s: float = 0.0  # ... and their compute

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
    up with ours, so the group must restart (the supervisor does it when the runtime process exits)."""


class Engine:
    def __init__(
        self,
        plan: NodePlan,
        blocks: dict,
        log,
        reply: Reply,
        share: Optional[Share] = None,
        on_round: Optional[Callable[[list[Step]], None]] = None,
    ):
        self.plan = plan
        self.log = log
        self.reply = reply
        self.share = share  # tensor parallelism: we lead the group
        self.on_round = on_round  # told which steps a round runs, just before it computes (for probes)
        # indexed by global block index; None where not held. A move may hold two ranges for a while:
        # the announced one (plan.start_block:end_block) and the one its open sessions still use.
        self.blocks: list = [None] * plan.total_blocks
        for index, block in blocks.items():
            self.blocks[index] = block
        self.loading: Optional[BlockLoader] = None
        self.loading_abandoned = False  # its move gave up (a DropBlocks came meanwhile): nothing is installed
        self.target = Target(DTYPES[plan.torch_dtype], torch.device(plan.device))
        self.caches = SessionCaches(self.target.dtype, self.target.device)
        self.queue = Scheduler(
            is_inference=lambda m: isinstance(m, InferStep), is_forward=lambda m: isinstance(m, Forward)
        )
        self.steps: list[Step] = []  # inference steps in progress (chunked prefills span rounds)
        self.forwards: list[Forwarding] = []  # forwards in progress (long ones span rounds)
        self.forward_turn: dict[str, None] = {}  # peers in the order their forwards advance next
        self.last_handles: set[int] = set()  # the sessions of the last inference round
        self.last_round_seconds = 0.0
        self.inference_while_training_waits = 0.0  # seconds of inference rounds since training last ran
        self.last_training_seconds = 0.0
        self.last_idle_check = time.monotonic()
        self.counts = RuntimeStats()  # the counters; `stats` adds the gauges

    @property
    def grouped(self) -> bool:
        return self.share is not None

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.steps or self.forwards)

    # --- receiving ---------------------------------------------------------------------------

    def take(self, sender: bytes, msg: Message, frames: Sequence = ()) -> None:
        """A message from a frontend (Forward, Backward, InferStep, Cancel) or the allocator (DropCache)."""
        if isinstance(msg, DropCache):
            self.drop_caches(msg.handles)
        elif isinstance(msg, Cancel):
            if not self.queue.cancel(sender, msg.req):
                self.steps = [s for s in self.steps if s.task.key != (sender, msg.req)]
        else:
            try:
                self.queue.push(sender, msg, list(frames))
            except QueueFull as e:
                self.counts.refused["queue"] = self.counts.refused.get("queue", 0) + 1
                self.log.info("refused", reason="queue", peer=getattr(msg, "peer", ""), detail=str(e))
                self.reply(sender, Failure(msg.req, str(e)), ())

    def control(self, msg: Message) -> list[Message]:
        """An order of the supervisor (LoadBlocks, Serve, DropBlocks); what to tell it at once."""
        if isinstance(msg, LoadBlocks) and self.grouped:
            self.log.warning("a group cannot load blocks while serving; the supervisor restarts it instead")
            return [BlocksLoaded(msg.start_block, msg.end_block, ok=False, error="tensor-parallel group")]
        if isinstance(msg, LoadBlocks) and self.loading is None:
            missing = [i for i in range(msg.start_block, msg.end_block) if self.blocks[i] is None]
            self.loading = BlockLoader(self.plan, self.log, (msg.start_block, msg.end_block), missing)
            self.loading_abandoned = False
        elif isinstance(msg, LoadBlocks):  # one load at a time: say so now rather than at the move's timeout
            error = f"blocks {list(self.loading.span)} are still loading"
            return [BlocksLoaded(msg.start_block, msg.end_block, ok=False, error=error)]
        elif isinstance(msg, Serve):
            self.plan.start_block, self.plan.end_block = msg.start_block, msg.end_block
        elif isinstance(msg, DropBlocks):
            kept = range(msg.start_block, msg.end_block)
            dropped = [i for i, b in enumerate(self.blocks) if b is not None and i not in kept]
            for i in dropped:
                self.blocks[i] = None
            # a DropBlocks while blocks load: the move that asked for them gave up (or switched before the
            # load ended, which the supervisor does not do): what the load brings is not installed
            self.loading_abandoned = self.loading is not None
            self.fail_outside(kept)
            self.drop_caches([h for h, c in self.caches.items() if c.start < msg.start_block or c.end > msg.end_block])
            self.log.info("blocks dropped", dropped=dropped, kept=[msg.start_block, msg.end_block])
        return []

    def fail_outside(self, kept: range) -> None:
        """Forwards and steps under way that need a block no longer held fail now, with a reason: left in
        their round, they made it fail for everyone in it (a block that is None is not callable)."""
        error = f"the server no longer serves these blocks (it moved to {kept.start}:{kept.stop}); retry elsewhere"

        def outside(first: int, count: int) -> bool:
            return first < kept.start or first + count > kept.stop

        for f in [f for f in self.forwards if outside(f.work.first, f.work.n_blocks)]:
            self.fail(f.task, error)
            self.forwards.remove(f)
        self.fail_steps(lambda step: outside(step.first, len(step.cache.kv)), error)

    def fail_steps(self, which: Callable[[Step], bool], error: str) -> None:
        """The steps under way for which `which` holds fail with `error` and leave the rounds."""
        for step in [s for s in self.steps if which(s)]:
            self.fail(step.task, error)
            self.steps.remove(step)

    def loaded(self) -> Optional[BlocksLoaded]:
        """Blocks loaded beside the served ones are installed (between rounds); what to tell the supervisor."""
        if self.loading is None or not self.loading.done.is_set():
            return None
        loader, self.loading = self.loading, None
        if loader.error is not None:
            self.log.error("cannot load the new blocks", blocks=list(loader.span), error=loader.error)
            return BlocksLoaded(*loader.span, ok=False, error=loader.error)
        if self.loading_abandoned:  # held until the next DropBlocks, for nobody, before
            self.log.info("blocks loaded for an abandoned move: not installed", blocks=list(loader.span))
            return BlocksLoaded(*loader.span, ok=False, error="the move was abandoned before the load ended")
        for index, block in loader.blocks.items():
            self.blocks[index] = block
        return BlocksLoaded(*loader.span)

    def drop_caches(self, handles) -> None:
        """The caches go, and with them the steps of their sessions under way or queued: continued, they made
        their caches again (at position 0 here, or on a tensor-parallel rank at their next chunk, which
        makes a cache on first sight), outside the allocator's books. Their grant has ended: whoever sent
        them (a frontend that died, a session past its lease) gets an error, if anyone still listens."""
        handles = list(handles)
        gone = set(handles)
        error = "this session's attention cache was released (its grant ended); open a new session"
        self.fail_steps(lambda step: step.task.msg.handle in gone, error)
        for task in [t for t in self.queue.inference if t.msg.handle in gone]:
            self.queue.cancel(task.sender, task.msg.req)
            self.fail(task, error)
        self.caches.drop(handles)
        if self.grouped and handles:
            self.share(GroupDrop(handles), ())

    def drop_idle_caches(self) -> None:
        """Caches nobody stepped for longer than any session may wait: their frontend died without the
        allocator noticing. Looked for every IDLE_CHECK_PERIOD seconds."""
        now = time.monotonic()
        if now - self.last_idle_check < IDLE_CHECK_PERIOD:
            return
        self.last_idle_check = now
        idle = self.caches.idle(self.plan.step_timeout + 60)
        if idle:
            self.drop_caches(idle)
            self.log.info("dropped idle caches", count=len(idle))

    # --- working -----------------------------------------------------------------------------

    def work(self) -> None:
        """One round: inference steps if any are ready, else forwards or a backward; training work that has
        waited long enough goes before inference (MAX_TRAINING_WAIT)."""
        if self.training_due() or not self.inference_round():
            began = time.perf_counter()
            self.training_round()
            self.last_training_seconds = time.perf_counter() - began
            self.inference_while_training_waits = 0.0

    @property
    def training_waits(self) -> bool:
        return bool(self.forwards or self.queue.training)

    def training_due(self) -> bool:
        waited = self.inference_while_training_waits
        return self.training_waits and waited > max(MAX_TRAINING_WAIT, 2 * self.last_training_seconds)

    def gather_deadline(self) -> Optional[float]:
        """Sessions of the last round whose next step is not here yet usually are a few milliseconds away
        (their clients are busy with the previous token). Starting without them would cost them a whole
        extra pass over the weights, so the owner may wait for their steps until this time.monotonic():
        at most one round's time, at most MAX_GATHER_WAIT. None: no reason to wait."""
        if not self.last_handles or not self.queue.inference or not self.stragglers():
            return None
        return time.monotonic() + min(MAX_GATHER_WAIT, 0.5 * self.last_round_seconds)

    def stragglers(self) -> list[int]:
        """Sessions of the last round (still open) whose next step has not arrived."""
        ready = {t.msg.handle for t in self.queue.inference} | {s.task.msg.handle for s in self.steps}
        return [h for h in self.last_handles if h not in ready and h in self.caches.caches]

    def drain(self, grace: float) -> None:
        """On stop: finish what is under way within `grace` seconds, fail the rest."""
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            self.work()
        unfinished = [s.task for s in self.steps] + [f.task for f in self.forwards]
        for task in unfinished + self.queue.inference + self.queue.training:
            self.reply(task.sender, Failure(task.msg.req, SHUTTING_DOWN, restarting=True), ())
        self.steps, self.forwards = [], []
        if self.grouped:
            self.share(GroupStop(), ())

    # --- inference rounds --------------------------------------------------------------------

    def inference_round(self) -> bool:
        busy = {s.task.msg.handle for s in self.steps}
        under_way = sum(step_cost(s.hidden.shape[0], s.hidden.shape[1] - s.done) for s in self.steps)
        room = INFERENCE_ROUND_TOKENS - under_way
        # a new step joins only while the round has room (the first one whatever its size): "at least one"
        # with no room left let one more prefill join every round, and rounds grew past any bound
        taken = self.queue.take_inference(busy, max_tokens=room, cost=task_cost) if room > 0 else []
        for task in taken:
            step = self.guard(task, self.admit)
            if step is not None:
                self.steps.append(step)
        self.steps = [s for s in self.steps if not self.finish_if_done(s)]
        if not self.steps:
            return False
        works, began = [], time.perf_counter()
        chunk_tokens = LONE_CHUNK if self.lone_step() else PREFILL_CHUNK
        self.last_handles = {step.task.msg.handle for step in self.steps}
        for step in self.steps:
            batch, length = step.hidden.shape[:2]
            take = min(length - step.done, max(1, chunk_tokens // batch))
            chunk = step.hidden[:, step.done : step.done + take]
            prompts = None
            if step.prompts is not None and step.done < step.prompts.shape[2]:
                prompts = step.prompts[:, :, step.done : step.done + take]
            works.append(
                compute.Work(
                    step.first, len(step.cache.kv), chunk, step.cache.kv, step.position + step.done, prompts, step=step
                )
            )
        if self.on_round is not None:
            self.on_round(self.steps)
        try:
            ran = time.perf_counter()
            outputs = self.run(works, [step.task.msg.adapter for step in self.steps])
            ran = time.perf_counter() - ran
        except Exception as e:  # out of memory or a bug: fail this round's steps, keep serving
            self.log.exception("inference round failed", sessions=len(self.steps))
            for step in self.steps:
                self.fail(step.task, self.retryable(e), restarting=self.grouped)
            self.steps = []
            self.break_group(e)
            return True
        for step, work, output in zip(self.steps, works, outputs):
            step.outputs.append(output)
            step.compute_s += ran
            step.done += work.hidden.shape[1]
            step.cache.length = step.position + step.done
            step.cache.last_used = time.monotonic()
        self.count_round(works, began)
        self.last_round_seconds = time.perf_counter() - began
        if self.training_waits:
            self.inference_while_training_waits += self.last_round_seconds
        else:  # what waited is gone (failed, cancelled): the next forward starts its own wait
            self.inference_while_training_waits = 0.0
        self.steps = [s for s in self.steps if not self.finish_if_done(s)]
        return True

    def lone_step(self) -> bool:
        """Whether the one step in progress has the runtime to itself: nothing else queued or in progress,
        no session of the last round that may step any moment, no forward or backward waiting. Its prefill
        then goes in chunks of LONE_CHUNK: nobody's next token waits behind it."""
        if len(self.steps) != 1 or self.queue.inference or self.training_waits:
            return False
        return not self.stragglers()

    def run(self, works: list, adapters: list[str]) -> list[torch.Tensor]:
        """Works through the blocks together, except that each adapter (or none) gets its own batch:
        a batch computes with one adapter active, so no request sees another's."""
        outputs: list = [None] * len(works)
        for adapter in dict.fromkeys(adapters):
            chosen = [i for i, a in enumerate(adapters) if a == adapter]
            if self.grouped:
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
        checks.states(hidden, "hidden_states", self.plan.hidden_size, msg.batch)
        checks.room(msg.position, hidden.shape[1], msg.max_length)
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
        if hypo_ids is not None and not self.grouped:
            compute.reorder_cache(cache.kv, hypo_ids)
            hypo_ids = None
        cache.length = msg.position  # a rollback forgets what came after
        return Step(task, cache, hidden, prompts, msg.position, first, hypo_ids=hypo_ids)

    def finish_if_done(self, step: Step) -> bool:
        if step.done < step.hidden.shape[1]:
            return False
        outputs = step.outputs
        output = step.hidden if not outputs else outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        self.succeed(step.task, [output], step.compute_s)
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
                self.succeed(tasks[0], outputs, time.perf_counter() - began)
            self.counts.busy_seconds += time.perf_counter() - began
            return
        for task in tasks:
            work = self.guard(task, self.prepare_forward)
            if work is not None and work.hidden.numel() == 0:  # no tokens: the blocks map none to none
                self.succeed(task, [work.hidden], 0.0)
            elif work is not None:
                self.forwards.append(Forwarding(task, work))
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
            ran = time.perf_counter()
            outputs = self.run(works, [f.task.msg.adapter for f in chosen])
            ran = time.perf_counter() - ran
        except Exception as e:
            self.log.exception("forward batch failed", requests=len(self.forwards))
            for f in self.forwards:
                self.fail(f.task, self.retryable(e), restarting=self.grouped)
            self.forwards = []
            self.break_group(e)
            return
        for f in chosen:  # served peers go to the end of the turn
            self.forward_turn.pop(f.task.peer, None)
            self.forward_turn[f.task.peer] = None
        for f, work, output in zip(chosen, works, outputs):
            f.advance(work.n_blocks, output)
            f.compute_s += ran
            if f.done:
                self.succeed(f.task, [output], f.compute_s)
        self.forwards = [f for f in self.forwards if not f.done]
        active = {f.task.peer for f in self.forwards}
        self.forward_turn = {peer: None for peer in self.forward_turn if peer in active}
        self.count_round(works, began)

    def prepare_forward(self, task: Task) -> compute.Work:
        msg: Forward = task.msg
        first, n_blocks = self.block_range(msg.start, msg.end)
        hidden, prompts = from_frames(msg.tensors, task.frames, ("hidden_states", "prompts"))
        checks.states(hidden, "hidden_states", self.plan.hidden_size)
        hidden = checks.finite(hidden, "hidden_states", self.target)
        return compute.Work(first, n_blocks, hidden, prompts=checks.prompts(prompts, self.target))

    def backward(self, task: Task) -> Optional[list[torch.Tensor]]:
        msg: Backward = task.msg
        first, n_blocks = self.block_range(msg.start, msg.end)
        tensors = from_frames(msg.tensors, task.frames, ("inputs", "grad_outputs", "prompts"))
        checks.states(tensors[0], "inputs", self.plan.hidden_size)
        if tensors[1].shape != tensors[0].shape:
            raise RequestError(f"grad_outputs has shape {list(tensors[1].shape)}, not that of inputs")
        x = checks.finite(tensors[0], "inputs", self.target)
        grad_outputs = checks.finite(tensors[1], "grad_outputs", self.target)
        prompts = checks.prompts(tensors[2], self.target)
        if x.numel() == 0:  # no tokens: nothing flows back
            return [x] if prompts is None else [x, torch.zeros_like(prompts)]
        if self.grouped:
            shared = [x, grad_outputs, prompts if prompts is not None else torch.empty(0)]
            metas, frames = to_frames(shared)
            self.share(GroupBackward(first, n_blocks, metas, msg.adapter), frames)
        try:
            with lora.activate(msg.adapter):
                grad_inputs, grad_prompts = compute.backward(
                    self.blocks[first : first + n_blocks],
                    x,
                    grad_outputs,
                    prompts,
                    # a group's ranks must run the same forwards (each one's collectives): none keeps more
                    # than the last block's graph, whatever its own shard would allow
                    keep_bytes=0 if self.grouped else self.plan.autograd_bytes,
                )
        except Exception as e:
            self.log.exception("backward failed", req=msg.req)
            self.fail(task, self.retryable(e), restarting=self.grouped)
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
        self.share(GroupRun(shard_works, metas, adapter), frames)

    def retryable(self, e: Exception) -> str:
        if not self.grouped:
            return f"{type(e).__name__}: {e}"
        return f"the server's tensor-parallel group failed and restarts ({type(e).__name__}: {e}); retry"

    def break_group(self, e: Exception) -> None:
        if self.grouped:
            raise GroupBroken(f"{type(e).__name__}: {e}") from e

    # --- answering ---------------------------------------------------------------------------

    def guard(self, task: Task, prepare):
        """Run `prepare(task)`; a bad request (or a bug) is answered with a Failure and gives None."""
        try:
            return prepare(task)
        except GroupBroken:
            raise
        except CacheMissing as e:
            self.counts.failed += 1
            self.reply(task.sender, Failure(task.msg.req, str(e), cache_missing=True), ())
        except (RequestError, FrameError) as e:
            self.fail(task, str(e))
        except Exception as e:  # a bug or out of memory must fail this request, not the runtime
            self.log.exception("task failed", task=type(task.msg).__name__, req=task.msg.req)
            self.fail(task, f"{type(e).__name__}: {e}")
        return None

    def succeed(self, task: Task, outputs: list[torch.Tensor], compute_s: float = 0.0) -> None:
        self.counts.done += 1
        self.counts.tokens += tokens(task)
        metas, frames = to_frames(outputs)
        self.reply(task.sender, Result(task.msg.req, metas, round(compute_s * 1e6)), frames)

    def fail(self, task: Task, error: str, restarting: bool = False) -> None:
        self.counts.failed += 1
        self.reply(task.sender, Failure(task.msg.req, error, restarting), ())

    def count_round(self, works: list, began: float) -> None:
        counts = self.counts
        counts.rounds += 1
        counts.round_sessions = len(works)
        counts.round_sizes[str(len(works))] = counts.round_sizes.get(str(len(works)), 0) + 1
        counts.round_tokens = sum(w.hidden.shape[0] * w.hidden.shape[1] for w in works)
        counts.busy_seconds += time.perf_counter() - began

    def stats(self, free_memory: Optional[int]) -> RuntimeStats:
        """The counters with the gauges of this moment (a copy: the owner publishes it)."""
        outside = sum(
            1 for _, c in self.caches.items() if c.start < self.plan.start_block or c.end > self.plan.end_block
        )
        return msgspec.structs.replace(
            self.counts,
            busy_seconds=round(self.counts.busy_seconds, 3),
            round_sizes=dict(self.counts.round_sizes),
            refused=dict(self.counts.refused),
            queue=len(self.queue),
            in_progress=len(self.steps) + len(self.forwards),
            sessions=len(self.caches),
            blocks_held=sum(b is not None for b in self.blocks),
            sessions_outside=outside,
            free_memory=free_memory,
        )
