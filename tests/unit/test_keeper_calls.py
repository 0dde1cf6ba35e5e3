"""The stream keeper's unary calls (node/keeper/calls.py), without p2pd or ZeroMQ: which frontend answers
a call, which answers count, and what happens to the calls of a frontend that dies."""

from __future__ import annotations

import structlog

from node.keeper.calls import NO_FRONTEND, STREAMED, UNARY, Calls
from node.keeper.table import Keeper
from protocol.messages import KeeperHello, UnaryCall, UnaryCancel, UnaryReply


class Sent(list):
    def __call__(self, frontend, msg, frames):
        self.append((frontend, msg, list(frames)))

    def to(self, frontend):
        return [m.call for f, m, _ in self if f == frontend and isinstance(m, UnaryCall)]


def setup(*frontends, first_id=1):
    sent = Sent()
    table = Keeper(sent, structlog.get_logger())
    calls = Calls(sent, lambda: table.frontends, structlog.get_logger(), first_id=first_id)
    for i, name in enumerate(frontends):
        table.hello(KeeperHello(name, 100 + i), now=0.0)
    return table, calls, sent


def test_the_rpcs_held_as_calls_are_petals_ones():
    assert UNARY == ("rpc_info", "rpc_forward", "rpc_backward", "rpc_push")
    assert STREAMED == ("rpc_forward_stream", "rpc_backward_stream")


def test_a_stream_s_request_goes_and_comes_back_in_its_parts_and_in_order_again_after_a_death():
    table, calls, sent = setup("frontend.0", "frontend.1")
    call = calls.start("rpc_forward_stream", "p", [b"part-1", b"part-2", b"part-3"], 0.0)
    assert sent[-1][2] == [b"part-1", b"part-2", b"part-3"]
    first = call.frontend
    table.down(first, 1.0)
    calls.down(first, 1.0)
    assert call.frontend not in (None, first) and sent[-1][2] == [b"part-1", b"part-2", b"part-3"]
    ended = calls.reply(call.frontend, UnaryReply(call.id), [b"out-1", memoryview(b"out-2")])
    assert ended is call and call.response == [b"out-1", b"out-2"]


def test_a_call_goes_to_the_accepting_frontend_with_the_fewest_calls_with_its_request():
    table, calls, sent = setup("frontend.0", "frontend.1")
    a = calls.start("rpc_forward", "peerA", [b"request-a"], 0.0)
    b = calls.start("rpc_info", "peerB", [b"request-b"], 0.0)
    assert {a.frontend, b.frontend} == {"frontend.0", "frontend.1"}
    frontend, msg, frames = sent[0]
    assert (msg.call, msg.rpc, msg.peer, frames) == (a.id, "rpc_forward", "peerA", [b"request-a"])
    calls.reply(a.frontend, UnaryReply(a.id), [b"response"])
    c = calls.start("rpc_backward", "peerC", [b"request-c"], 0.0)
    assert c.frontend == a.frontend  # a's answer left that frontend with none
    assert calls.count() == 2


def test_a_retiring_frontend_gets_no_calls_and_a_stopping_node_s_frontends_still_do():
    table, calls, sent = setup("frontend.0", "frontend.1")
    table.hello(KeeperHello("frontend.1", 101, accepting=False), now=0.0)  # a reload: it retires
    assert {calls.start("rpc_forward", "p", [b"x"], 0.0).frontend for _ in range(4)} == {"frontend.0"}
    # the node stops: every frontend drains; they refuse new work themselves, and take pushes
    table.hello(KeeperHello("frontend.0", 100, accepting=False, draining=True), now=0.0)
    assert calls.start("rpc_push", "p", [b"x"], 0.0).frontend == "frontend.0"


def test_an_answer_ends_its_call_once_and_only_from_the_frontend_that_holds_it():
    table, calls, sent = setup("frontend.0", "frontend.1")
    call = calls.start("rpc_forward", "p", [b"x"], 0.0)
    other = "frontend.1" if call.frontend == "frontend.0" else "frontend.0"
    assert calls.reply(other, UnaryReply(call.id), [b"wrong"]) is None
    assert calls.reply(call.frontend, UnaryReply(call.id + 1000), [b"unknown"]) is None
    ended = calls.reply(call.frontend, UnaryReply(call.id, error="ValueError('bad uid')"), [])
    assert ended is call and call.done and call.error == "ValueError('bad uid')" and call.response is None
    assert calls.reply(call.frontend, UnaryReply(call.id), [b"late"]) is None
    assert call.response is None


def test_a_dead_frontend_s_calls_go_to_another_pushes_included():
    table, calls, sent = setup("frontend.0", "frontend.1")
    held = [calls.start(rpc, "p", [rpc.encode()], 0.0) for rpc in UNARY for _ in range(2)]
    dead = [c for c in held if c.frontend == "frontend.0"]
    assert dead
    table.down("frontend.0", 1.0)
    calls.down("frontend.0", 1.0)
    assert all(c.frontend == "frontend.1" and not c.done for c in held)
    resent = sent.to("frontend.1")
    assert all(resent.count(c.id) == 1 for c in dead)  # each asked again, with its request
    assert [fr for f, m, fr in sent if f == "frontend.1" and m.call == dead[0].id] == [dead[0].frames]
    assert calls.resent == len(dead)
    assert calls.reply("frontend.0", UnaryReply(dead[0].id), [b"late"]) is None  # the dead one's late answer
    assert calls.reply("frontend.1", UnaryReply(dead[0].id), [b"ok"]).response == [b"ok"]


def test_with_no_frontend_a_call_waits_for_the_replacement_or_ends_after_the_limit():
    table, calls, sent = setup("frontend.0")
    call = calls.start("rpc_forward", "p", [b"x"], 0.0)
    table.down("frontend.0", 1.0)
    calls.down("frontend.0", 1.0)
    assert call.frontend is None and not call.done and calls.overdue(30.0, 60.0) == []
    table.hello(KeeperHello("frontend.0", 200), now=5.0)  # its replacement
    calls.assign_waiting()
    assert call.frontend == "frontend.0" and sent.to("frontend.0").count(call.id) == 2

    lost = calls.start("rpc_info", "p", [b"y"], 10.0)
    table.down("frontend.0", 11.0)
    calls.down("frontend.0", 11.0)
    assert calls.overdue(70.0, 60.0) == []
    ended = calls.overdue(71.5, 60.0)
    assert lost in ended and call in ended and lost.error == NO_FRONTEND.format(limit=60.0)


def test_a_call_that_comes_before_any_frontend_waits_for_one():
    table, calls, sent = setup()
    call = calls.start("rpc_info", "p", [b"x"], 0.0)
    assert call.frontend is None and sent == []
    table.hello(KeeperHello("frontend.0", 100), now=1.0)
    calls.assign_waiting()
    assert call.frontend == "frontend.0"


def test_a_forgotten_call_takes_no_answer_and_the_stop_ends_the_rest():
    table, calls, sent = setup("frontend.0")
    gone, open_ = calls.start("rpc_forward", "p", [b"x"], 0.0), calls.start("rpc_forward", "p", [b"y"], 0.0)
    calls.forget(gone)  # its caller left: its frontend stops the work
    assert [(f, m.call) for f, m, _ in sent if isinstance(m, UnaryCancel)] == [("frontend.0", gone.id)]
    assert calls.reply("frontend.0", UnaryReply(gone.id), [b"late"]) is None
    streaming = calls.start("rpc_backward_stream", "p", [b"part"], 0.0)
    ended = calls.end_all("ShuttingDown('stopping')", "stopping")
    assert ended == [open_, streaming] and open_.error == "ShuttingDown('stopping')" and streaming.error == "stopping"
    answered = calls.start("rpc_info", "p", [b"z"], 0.0)
    calls.reply("frontend.0", UnaryReply(answered.id), [b"info"])
    calls.forget(answered)  # answered: nothing to stop
    assert len([m for _, m, _ in sent if isinstance(m, UnaryCancel)]) == 1


def test_a_replaced_keeper_numbers_its_calls_above_its_predecessor_s():
    _, old, _ = setup("frontend.0", first_id=1_000)
    _, new, _ = setup("frontend.0", first_id=2_000)
    assert old.start("rpc_info", "p", [b""], 0.0).id == 1_000
    assert new.start("rpc_info", "p", [b""], 0.0).id == 2_000


def test_a_call_given_up_by_a_retiring_frontend_goes_to_its_successor():
    table, calls, sent = setup("frontend.0")
    call = calls.start("rpc_forward_stream", "p", [b"part"], 0.0)
    table.hello(KeeperHello("frontend.0", 100, accepting=False), now=1.0)  # a reload: it retires
    assert calls.reply("frontend.0", UnaryReply(call.id, again=True), [], now=2.0) is None
    assert call.frontend is None and not call.done and call.waiting_since == 2.0  # no successor yet
    table.hello(KeeperHello("frontend.1", 101), now=3.0)
    calls.assign_waiting()
    assert call.frontend == "frontend.1" and sent.to("frontend.1") == [call.id] and sent[-1][2] == [b"part"]
    assert calls.reply("frontend.1", UnaryReply(call.id), [b"out"]).response == [b"out"]
