"""The runtime's order of work: inference steps first and together, then forwards merged, backwards alone."""

from __future__ import annotations

from types import SimpleNamespace

from node.runtime.scheduler import Scheduler, tokens
from protocol.messages import TensorMeta


def step(req, handle):
    return SimpleNamespace(kind="step", req=req, handle=handle, tensors=[TensorMeta("float32", (1, 1, 8))])


def forward(req, batch=1, length=100):
    return SimpleNamespace(kind="forward", req=req, tensors=[TensorMeta("float32", (batch, length, 8))])


def backward(req):
    return SimpleNamespace(kind="backward", req=req, tensors=[TensorMeta("float32", (1, 10, 8))])


def scheduler():
    return Scheduler(is_inference=lambda m: m.kind == "step", is_forward=lambda m: m.kind == "forward")


def test_all_ready_steps_go_together_one_per_session():
    queue = scheduler()
    queue.push(b"f0", forward(1), [])
    queue.push(b"f0", step(2, handle=7), [])
    queue.push(b"f1", step(3, handle=8), [])
    queue.push(b"f1", step(4, handle=7), [])  # a second step of session 7 waits for the first
    assert [t.msg.req for t in queue.take_inference()] == [2, 3]
    assert [t.msg.req for t in queue.take_inference(busy={7})] == []
    assert [t.msg.req for t in queue.take_inference()] == [4]
    assert [t.msg.req for t in queue.take_training(max_tokens=1000)] == [1]


def test_forwards_merge_up_to_the_token_budget_and_backwards_go_alone():
    queue = scheduler()
    for req in (1, 2, 3):
        queue.push(b"f0", forward(req, batch=2, length=100), [])  # 200 tokens each
    queue.push(b"f0", backward(4), [])
    queue.push(b"f0", forward(5), [])
    assert tokens(queue.training[0]) == 200
    assert [t.msg.req for t in queue.take_training(max_tokens=450)] == [1, 2]
    assert [t.msg.req for t in queue.take_training(max_tokens=450)] == [3]
    assert [t.msg.req for t in queue.take_training(max_tokens=450)] == [4]
    assert [t.msg.req for t in queue.take_training(max_tokens=10)] == [5]  # one always goes, whatever its size


def test_cancelled_work_is_dropped():
    queue = scheduler()
    queue.push(b"f0", forward(1), [])
    queue.push(b"f1", forward(1), [])  # the same request id from another frontend is another request
    assert queue.cancel(b"f0", 1) and not queue.cancel(b"f0", 99)
    assert [t.sender for t in queue.take_training(max_tokens=1000)] == [b"f1"]
    assert len(queue) == 0
