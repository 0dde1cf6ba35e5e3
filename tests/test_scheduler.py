"""The runtime's order of work: inference steps first, then forward/backward, each first come first served."""

from __future__ import annotations

from types import SimpleNamespace

from node.scheduler import Scheduler


def msg(req):
    return SimpleNamespace(req=req)


def test_inference_goes_before_earlier_training_work():
    queue = Scheduler()
    queue.push(b"frontend.0", msg(1), [], inference=False)
    queue.push(b"frontend.1", msg(2), [], inference=False)
    queue.push(b"frontend.0", msg(3), [], inference=True)
    queue.push(b"frontend.1", msg(4), [], inference=True)
    order = []
    while (task := queue.pop()) is not None:
        order.append(task.msg.req)
    assert order == [3, 4, 1, 2]


def test_cancelled_work_is_skipped_and_forgotten():
    queue = Scheduler()
    queue.push(b"frontend.0", msg(1), [], inference=False)
    queue.push(b"frontend.1", msg(1), [], inference=False)  # same id from another frontend: not cancelled
    queue.cancel(b"frontend.0", 1)
    queue.cancel(b"frontend.0", 99)  # unknown: ignored
    assert [queue.pop().sender, queue.pop()] == [b"frontend.1", None]
    assert len(queue) == 0
