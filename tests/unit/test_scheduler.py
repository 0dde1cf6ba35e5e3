"""The runtime's order of work: inference steps first and together, then forwards merged, backwards alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from node.runtime.scheduler import QueueFull, Scheduler, tokens
from protocol.messages import TensorMeta


def step(req, handle, peer=""):
    return SimpleNamespace(kind="step", req=req, handle=handle, peer=peer, tensors=[TensorMeta("float32", (1, 1, 8))])


def forward(req, batch=1, length=100, peer="", points=0.0):
    tensors = [TensorMeta("float32", (batch, length, 8))]
    return SimpleNamespace(kind="forward", req=req, peer=peer, points=points, tensors=tensors)


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


def test_peers_take_turns_so_a_flood_starves_nobody():
    """A peer with many ready steps and forwards cannot push another peer's work out of a round."""
    queue = scheduler()
    for req in range(100):
        queue.push(b"f0", step(req, handle=req, peer="flood"), [])
        queue.push(b"f0", forward(1000 + req, peer="flood"), [])
    queue.push(b"f1", step(500, handle=500, peer="honest"), [])
    queue.push(b"f1", forward(501, peer="honest"), [])
    first_round = [t.msg.req for t in queue.take_inference(max_tokens=4)]
    assert len(first_round) == 4 and 500 in first_round  # the honest step is in the first round
    forwards = [t.msg.req for t in queue.take_training(max_tokens=300)]
    assert 501 in forwards and len(forwards) == 3  # 100 tokens each, peers in turn


def test_points_order_a_peers_own_requests_only():
    queue = scheduler()
    queue.push(b"f0", forward(1, peer="a", points=0.0), [])
    queue.push(b"f0", forward(2, peer="a", points=5.0), [])
    queue.push(b"f0", forward(3, peer="b", points=1e9), [])
    assert [t.msg.req for t in queue.take_training(max_tokens=100)] == [2]  # a's turn: its richer request
    assert [t.msg.req for t in queue.take_training(max_tokens=100)] == [3]  # b's turn, however many points
    assert [t.msg.req for t in queue.take_training(max_tokens=100)] == [1]


def test_the_queues_are_bounded_per_peer_and_in_all():
    from node.runtime import scheduler as module

    queue = scheduler()
    for req in range(module.MAX_QUEUED_PER_PEER):
        queue.push(b"f0", forward(req, peer="flood"), [])
    with pytest.raises(QueueFull, match="tasks waiting on this server"):
        queue.push(b"f0", forward(9999, peer="flood"), [])
    queue.push(b"f0", forward(1, peer="other"), [])  # another peer still gets in
    assert len(queue) == module.MAX_QUEUED_PER_PEER + 1
