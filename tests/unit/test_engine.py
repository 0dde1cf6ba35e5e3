"""The block runtime's engine (node/runtime/engine.py) driven in-process, without ZeroMQ: messages go in
through `take`, answers come back through the reply callable. Outputs equal the blocks run alone (the
micro Llama's four blocks, float32)."""

from __future__ import annotations

import pytest
import structlog
import torch

from node.runtime import compute
from node.runtime import engine as engine_module
from node.runtime.engine import PREFILL_CHUNK, Engine
from node.runtime.loading import load_blocks
from protocol.frames import from_frames, to_frames
from protocol.messages import (
    Backward,
    BlocksLoaded,
    Cancel,
    DropBlocks,
    DropCache,
    Failure,
    Forward,
    InferStep,
    LoadBlocks,
    Result,
    Serve,
)
from tests.helpers.plans import micro_plan
from tests.helpers.reference import rel_err

TOL = 1e-5
HIDDEN = 64


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return micro_plan(str(tmp_path_factory.mktemp("run")), "--max_batch_size", "64")


@pytest.fixture(scope="module")
def blocks(plan):
    return load_blocks(plan, structlog.get_logger())


class Driver:
    """An engine and the answers it gave, by (sender, req)."""

    def __init__(self, plan, blocks):
        import msgspec

        self.answers: dict = {}
        self.order: list = []
        self.engine = Engine(msgspec.structs.replace(plan), blocks, structlog.get_logger(), self.reply)
        self.req = 0

    def reply(self, to, msg, frames):
        key = (to, msg.req)
        self.order.append(key)
        self.answers[key] = (msg, [bytearray(f) for f in frames])

    def send(self, sender: bytes, msg_type, tensors, **fields):
        self.req += 1
        metas, frames = to_frames(tensors)
        self.engine.take(sender, msg_type(req=self.req, tensors=metas, **fields), [bytearray(f) for f in frames])
        return sender, self.req

    def step(self, sender, handle, hidden, position, max_length=32, **fields):
        return self.send(
            sender,
            InferStep,
            [hidden, torch.empty(0), torch.empty(0, dtype=torch.int64)],
            session=f"s{handle}",
            handle=handle,
            start=fields.pop("start", 0),
            end=fields.pop("end", 4),
            position=position,
            max_length=max_length,
            batch=hidden.shape[0],
            peer=sender.decode(),
            **fields,
        )

    def run_until(self, keys, rounds=50):
        for _ in range(rounds):
            if all(k in self.answers for k in keys):
                break
            self.engine.work()
        return [self.answer(k) for k in keys]

    def answer(self, key):
        msg, frames = self.answers[key]
        if isinstance(msg, Failure):
            return msg
        assert isinstance(msg, Result)
        return from_frames(msg.tensors, frames)


def alone(blocks: dict, hidden, start=0, end=4):
    with torch.no_grad():
        return compute.run([blocks[i] for i in range(4)], [compute.Work(start, end - start, hidden)], 1 << 30)[0]


def test_inference_rounds_of_several_sessions_equal_each_alone(plan, blocks):
    """Three sessions of two peers, prefills of different lengths then token by token: each session's
    outputs equal its whole sequence run alone, and the sessions shared rounds."""
    driver = Driver(plan, blocks)
    torch.manual_seed(1)
    sequences = {1: torch.randn(1, 7, HIDDEN), 2: torch.randn(2, 3, HIDDEN), 3: torch.randn(1, 5, HIDDEN)}
    senders = {1: b"frontend.0", 2: b"frontend.1", 3: b"frontend.0"}
    outputs = {h: [] for h in sequences}
    prefill = {1: 4, 2: 1, 3: 5}
    keys = {h: driver.step(senders[h], h, seq[:, : prefill[h]], 0) for h, seq in sequences.items()}
    for h, (out,) in zip(keys, driver.run_until(list(keys.values()))):
        outputs[h].append(out)
    position = dict(prefill)
    while any(position[h] < seq.shape[1] for h, seq in sequences.items()):
        keys = {}
        for h, seq in sequences.items():
            if position[h] < seq.shape[1]:
                keys[h] = driver.step(senders[h], h, seq[:, position[h] : position[h] + 1], position[h])
                position[h] += 1
        for h, (out,) in zip(keys, driver.run_until(list(keys.values()))):
            outputs[h].append(out)
    for h, seq in sequences.items():
        assert rel_err(torch.cat(outputs[h], dim=1), alone(blocks, seq)) <= TOL
    assert driver.engine.counts.round_sizes.get("3", 0) >= 1  # the three sessions ran together
    assert len(driver.engine.caches) == 3


def test_a_long_prefill_goes_in_chunks_beside_other_sessions(plan, blocks):
    driver = Driver(plan, blocks)
    torch.manual_seed(2)
    long = torch.randn(1, PREFILL_CHUNK + 40, HIDDEN)
    short = torch.randn(1, 2, HIDDEN)
    a = driver.step(b"frontend.0", 1, long, 0, max_length=PREFILL_CHUNK + 64)
    b = driver.step(b"frontend.0", 2, short, 0)
    driver.engine.work()
    assert b in driver.answers and a not in driver.answers  # the short one did not wait for the whole prefill
    (out_a,) = driver.run_until([a])[0]
    assert rel_err(out_a, alone(blocks, long)) <= TOL


def test_a_long_prefill_alone_on_the_runtime_goes_in_one_round(plan, blocks):
    """Nobody else's token can wait behind it: one round (513 tokens in one pass, not 256 + 256 + 1)."""
    driver = Driver(plan, blocks)
    torch.manual_seed(2)
    long = torch.randn(1, 2 * PREFILL_CHUNK + 1, HIDDEN)
    a = driver.step(b"frontend.0", 1, long, 0, max_length=2 * PREFILL_CHUNK + 8)
    driver.engine.work()
    (out,) = driver.answer(a)
    assert rel_err(out, alone(blocks, long)) <= TOL
    assert driver.engine.counts.rounds == 1


def test_a_long_prefill_is_chunked_while_a_session_of_the_last_round_may_step(plan, blocks):
    """A session that just stepped sends its next token any moment: it must not wait for a whole prefill."""
    driver = Driver(plan, blocks)
    torch.manual_seed(2)
    driver.run_until([driver.step(b"frontend.1", 2, torch.randn(1, 3, HIDDEN), 0)])
    long = torch.randn(1, PREFILL_CHUNK + 40, HIDDEN)
    a = driver.step(b"frontend.0", 1, long, 0, max_length=PREFILL_CHUNK + 64)
    driver.engine.work()
    assert a not in driver.answers
    (out,) = driver.run_until([a])[0]
    assert rel_err(out, alone(blocks, long)) <= TOL


def test_a_forward_waits_for_inference_then_runs(plan, blocks):
    driver = Driver(plan, blocks)
    torch.manual_seed(3)
    hidden = torch.randn(2, 6, HIDDEN)
    forward = driver.send(b"frontend.0", Forward, [hidden, torch.empty(0)], start=1, end=4, peer="p")
    step = driver.step(b"frontend.1", 7, torch.randn(1, 3, HIDDEN), 0)
    driver.engine.work()
    assert driver.order == [step]  # inference goes first
    (out,) = driver.run_until([forward])[0]
    assert rel_err(out, alone(blocks, hidden, 1, 4)) <= TOL


def test_a_forward_waits_for_inference_a_bounded_time(plan, blocks, monkeypatch):
    """A peer that keeps sending prefills does not hold another peer's forward for as long as it sends:
    the forward runs once it has waited through MAX_TRAINING_WAIT seconds of inference rounds, and then
    inference goes first again."""
    monkeypatch.setattr(engine_module, "MAX_TRAINING_WAIT", 0.0)
    driver = Driver(plan, blocks)
    torch.manual_seed(5)
    hidden = torch.randn(1, 4, HIDDEN)
    flood = [
        driver.step(b"frontend.1", h, torch.randn(1, 2 * PREFILL_CHUNK, HIDDEN), 0, max_length=1024) for h in range(8)
    ]
    forward = driver.send(b"frontend.0", Forward, [hidden, torch.empty(0)], start=0, end=4, peer="honest")
    driver.engine.work()  # an inference round: the forward has waited through none yet
    assert forward not in driver.answers
    driver.engine.work()  # its wait is over: it goes before the prefills still queued
    (out,) = driver.run_until([forward], rounds=1)[0]
    assert rel_err(out, alone(blocks, hidden)) <= TOL
    assert not any(k in driver.answers for k in flood)
    driver.run_until(flood, rounds=200)
    assert all(k in driver.answers for k in flood)


def test_a_wait_whose_work_went_away_does_not_let_the_next_forward_jump(plan, blocks):
    """The inference time a forward waited through is its own: if it goes away unrun (failed, its peer
    gone), the next forward starts a wait of its own instead of inheriting the old one."""
    driver = Driver(plan, blocks)
    torch.manual_seed(5)
    flood = [
        driver.step(b"frontend.1", h, torch.randn(1, 2 * PREFILL_CHUNK, HIDDEN), 0, max_length=1024) for h in range(8)
    ]
    driver.engine.inference_while_training_waits = 10.0  # as a forward that was failed while waiting left it
    driver.engine.work()  # an inference round, with no training work waiting
    forward = driver.send(b"frontend.0", Forward, [torch.randn(1, 4, HIDDEN), torch.empty(0)], start=0, end=4)
    driver.engine.work()
    assert forward not in driver.answers
    driver.run_until(flood + [forward], rounds=200)


def test_a_backward_gives_the_input_gradients(plan, blocks):
    driver = Driver(plan, blocks)
    torch.manual_seed(4)
    x, grad = torch.randn(1, 4, HIDDEN), torch.randn(1, 4, HIDDEN)
    key = driver.send(b"frontend.0", Backward, [x, grad, torch.empty(0)], start=0, end=2, peer="p")
    (grad_x,) = driver.run_until([key])[0]
    with torch.enable_grad():
        leaf = x.clone().requires_grad_()
        out = leaf
        for i in range(2):
            out = blocks[i](out)
        (out * grad).sum().backward()
    assert rel_err(grad_x, leaf.grad) <= TOL


def test_a_dropped_cache_is_missing_until_the_session_starts_again(plan, blocks):
    """The allocator ends a grant (or a replaced runtime never had the cache): the next step is answered
    'cache missing', so that the frontend rebuilds it; a step at position 0 makes a new cache."""
    driver = Driver(plan, blocks)
    torch.manual_seed(5)
    seq = torch.randn(1, 4, HIDDEN)
    driver.run_until([driver.step(b"frontend.0", 9, seq[:, :3], 0)])
    driver.engine.take(b"allocator", DropCache([9]))
    (failure,) = driver.run_until([driver.step(b"frontend.0", 9, seq[:, 3:], 3)])
    assert isinstance(failure, Failure) and failure.cache_missing
    (out,) = driver.run_until([driver.step(b"frontend.0", 9, seq, 0)])[0]  # rebuilt from the history
    assert rel_err(out, alone(blocks, seq)) <= TOL


def test_bad_requests_are_answered_and_the_others_served(plan, blocks):
    driver = Driver(plan, blocks)
    torch.manual_seed(6)
    good = driver.step(b"frontend.0", 1, torch.randn(1, 2, HIDDEN), 0)
    nan = driver.step(b"frontend.0", 2, torch.full((1, 2, HIDDEN), float("nan")), 0)
    outside = driver.send(b"frontend.0", Forward, [torch.randn(1, 2, HIDDEN), torch.empty(0)], start=2, end=9)
    late = driver.step(b"frontend.0", 3, torch.randn(1, 2, HIDDEN), 5)
    results = driver.run_until([good, nan, outside, late])
    assert not isinstance(results[0], Failure)
    assert "hidden_states" in results[1].error
    assert "blocks 2:9 are not served here (this node serves 0:4)" in results[2].error
    assert results[3].cache_missing


def test_a_cancelled_step_is_never_run(plan, blocks):
    driver = Driver(plan, blocks)
    key = driver.step(b"frontend.0", 1, torch.randn(1, 2, HIDDEN), 0)
    driver.engine.take(b"frontend.0", Cancel(key[1]))
    for _ in range(3):
        driver.engine.work()
    assert not driver.answers and not driver.engine.busy


def test_a_move_drops_the_old_blocks_and_their_sessions(plan, blocks):
    driver = Driver(plan, blocks)
    driver.run_until([driver.step(b"frontend.0", 1, torch.randn(1, 2, HIDDEN), 0, start=0, end=2)])
    driver.run_until([driver.step(b"frontend.0", 2, torch.randn(1, 2, HIDDEN), 0, start=2, end=4)])
    assert driver.engine.control(Serve(2, 4)) == []
    assert driver.engine.stats(None).sessions_outside == 1
    driver.engine.control(DropBlocks(2, 4))
    stats = driver.engine.stats(None)
    assert (stats.blocks_held, stats.sessions, stats.sessions_outside) == (2, 1, 0)
    (failure,) = driver.run_until([driver.step(b"frontend.0", 3, torch.randn(1, 1, HIDDEN), 0, start=0, end=2)])
    assert "blocks 0:2 are not served here (this node serves 2:4)" in failure.error


def test_a_stop_finishes_what_is_under_way_and_fails_the_rest(plan, blocks):
    driver = Driver(plan, blocks)
    started = driver.step(b"frontend.0", 1, torch.randn(1, 2, HIDDEN), 0)
    driver.engine.drain(grace=0.0)  # no time: nothing more runs
    (failure,) = [driver.answer(started)]
    assert isinstance(failure, Failure) and failure.restarting and "shutting down" in failure.error
    driver = Driver(plan, blocks)
    started = driver.step(b"frontend.0", 1, torch.randn(1, 2, HIDDEN), 0)
    driver.engine.drain(grace=30.0)
    assert not isinstance(driver.answer(started), Failure)


def test_requests_without_tokens_are_answered_without_compute(plan, blocks):
    """A forward of [1, 0, H] divided by its token count and took the runtime down; a backward of none
    has nothing to give back. Both are answered with empty tensors, and the runtime serves on."""
    driver = Driver(plan, blocks)
    forward = driver.send(b"frontend.0", Forward, [torch.randn(1, 0, HIDDEN), torch.empty(0)], start=0, end=4)
    empty = torch.randn(0, 3, HIDDEN)
    backward = driver.send(b"frontend.0", Backward, [empty, empty.clone(), torch.empty(0)], start=0, end=4)
    after = driver.send(b"frontend.0", Forward, [torch.randn(1, 2, HIDDEN), torch.empty(0)], start=0, end=4)
    (out,), (grad,), (later,) = driver.run_until([forward, backward, after])
    assert out.shape == (1, 0, HIDDEN) and grad.shape == (0, 3, HIDDEN) and later.shape == (1, 2, HIDDEN)


def test_inference_rounds_stay_within_their_tokens_however_many_prefills_wait(plan, blocks):
    """With no room left in a round, one more step still joined every round ("at least one"): 16 prefills of 2048
    tokens made rounds of 2816 tokens against 1024. The first step of a round still comes whatever its
    size, so a round holds at most INFERENCE_ROUND_TOKENS plus one step's chunk."""
    driver = Driver(plan, blocks)
    torch.manual_seed(8)
    keys = [driver.step(b"frontend.%d" % h, h, torch.randn(1, 2048, HIDDEN), 0, max_length=2048) for h in range(16)]
    largest = 0
    for _ in range(400):
        if all(k in driver.answers for k in keys):
            break
        driver.engine.work()
        largest = max(largest, driver.engine.counts.round_tokens)
    assert all(not isinstance(driver.answer(k), Failure) for k in keys)
    assert largest <= engine_module.INFERENCE_ROUND_TOKENS + PREFILL_CHUNK


def test_work_on_dropped_blocks_fails_alone(plan, blocks):
    """A move dropped blocks under a forward still under way: its next round failed, and with it every
    other forward in that round (a dropped block is None). Now it fails at once with a reason, and the
    forwards on the blocks still held are served."""
    driver = Driver(plan, blocks)
    driver.engine.plan.max_batch_size = 8  # a forward of 8 tokens goes a block per round
    try:
        torch.manual_seed(9)
        moved = driver.send(b"frontend.0", Forward, [torch.randn(1, 8, HIDDEN), torch.empty(0)], start=0, end=4)
        driver.engine.work()
        assert moved not in driver.answers
        staying = torch.randn(1, 2, HIDDEN)
        kept = driver.send(b"frontend.1", Forward, [staying, torch.empty(0)], start=2, end=4, peer="b")
        driver.engine.control(DropBlocks(2, 4))
        failure, (out,) = driver.run_until([moved, kept])
        assert isinstance(failure, Failure) and "no longer serves these blocks" in failure.error
        assert rel_err(out, alone(blocks, staying, 2, 4)) <= TOL
    finally:
        driver.engine.plan.max_batch_size = plan.max_batch_size


def test_the_steps_of_a_dropped_cache_end_with_it(plan, blocks):
    """The allocator ends a grant while its session's prefill is under way, or a step of it waits: left to
    run, they made the cache again (on a tensor-parallel rank for good), outside the allocator's books."""
    driver = Driver(plan, blocks)
    torch.manual_seed(10)
    long = driver.step(b"frontend.0", 1, torch.randn(1, 3 * PREFILL_CHUNK, HIDDEN), 0, max_length=3 * PREFILL_CHUNK)
    other = driver.step(b"frontend.1", 2, torch.randn(1, 2, HIDDEN), 0)
    driver.engine.work()  # the long prefill's first chunk: under way
    waiting = driver.step(b"frontend.0", 3, torch.randn(1, 2, HIDDEN), 0)
    driver.engine.take(b"allocator", DropCache([1, 3]))
    a, b, c = driver.run_until([long, other, waiting])
    assert isinstance(a, Failure) and "released" in a.error and isinstance(c, Failure)
    assert not isinstance(b, Failure)
    assert set(h for h, _ in driver.engine.caches.items()) == {2}


@pytest.mark.parametrize(
    "hidden, batch, max_length, position, expected",
    [
        (torch.randn(HIDDEN), 1, 16, 0, "must have shape [1, length, 64]"),
        (torch.randn(2, 3, HIDDEN), 1, 16, 0, "must have shape [1, length, 64]"),
        (torch.randn(1, 3, 32), 1, 16, 0, "must have shape [1, length, 64]"),
        (torch.randn(1, 5, HIDDEN), 1, 4, 0, "exceeds the session's max_length 4"),
    ],
)
def test_a_step_whose_shape_the_cache_cannot_take_is_refused_alone(
    plan, blocks, hidden, batch, max_length, position, expected
):
    """The frontend checks these; a runtime that trusted them failed every session of the round (or, for a
    1-D tensor, died)."""
    driver = Driver(plan, blocks)
    good = driver.step(b"frontend.0", 1, torch.randn(1, 2, HIDDEN), 0)
    driver.req += 1
    metas, frames = to_frames([hidden, torch.empty(0), torch.empty(0, dtype=torch.int64)])
    msg = InferStep(driver.req, "s9", 9, 0, 4, position, max_length, batch, metas, peer="frontend.1")
    driver.engine.take(b"frontend.1", msg, [bytearray(f) for f in frames])
    result, refused = driver.run_until([good, (b"frontend.1", driver.req)])
    assert not isinstance(result, Failure)
    assert isinstance(refused, Failure) and expected in refused.error


def test_a_step_for_a_cache_of_another_shape_is_refused(plan, blocks):
    driver = Driver(plan, blocks)
    driver.run_until([driver.step(b"frontend.0", 1, torch.randn(1, 2, HIDDEN), 0, max_length=32)])
    (refused,) = driver.run_until([driver.step(b"frontend.0", 1, torch.randn(2, 1, HIDDEN), 2, max_length=32)])
    assert isinstance(refused, Failure) and "holds a batch of 1 x 32 tokens, not 2 x 32" in refused.error


def test_a_load_asked_while_another_runs_is_refused_at_once(plan, blocks):
    """It was ignored, and its move waited for its timeout (or took the other load's answer for its own)."""
    driver = Driver(plan, blocks)
    assert driver.engine.control(LoadBlocks(0, 4)) == []
    (refused,) = driver.engine.control(LoadBlocks(0, 2))
    assert (refused.start_block, refused.end_block, refused.ok) == (0, 2, False)
    assert "still loading" in refused.error
    driver.engine.loading.done.wait(30)
    assert driver.engine.loaded() == BlocksLoaded(0, 4)


def test_blocks_loading_for_a_move_that_gave_up_are_not_installed(plan, blocks):
    """A load that outlived its move's timeout installed its blocks when it ended: memory held for blocks
    nobody serves, until some later move dropped them."""
    driver = Driver(plan, blocks)
    driver.engine.control(DropBlocks(0, 2))  # the node serves 0:2
    driver.engine.control(LoadBlocks(0, 4))  # a move to 0:4 loads 2:4 ...
    driver.engine.control(DropBlocks(0, 2))  # ... and gives up before the load ends
    assert driver.engine.loading.done.wait(60)
    answer = driver.engine.loaded()
    assert not answer.ok and "abandoned" in answer.error
    assert driver.engine.blocks[2] is None and driver.engine.blocks[3] is None
    driver.engine.control(LoadBlocks(0, 4))  # the next move's load is installed
    assert driver.engine.loading.done.wait(60)
    assert driver.engine.loaded() == BlocksLoaded(0, 4) and driver.engine.blocks[3] is not None
