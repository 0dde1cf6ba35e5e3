"""The stream keeper's decisions (node/keeper/table.py), without p2pd or ZeroMQ: which frontend serves a
stream, what is logged, backpressure, and the hand-over of a dead frontend's streams."""

from __future__ import annotations

import structlog

from node.keeper.table import FRONTEND_LOST, WINDOW, Close, Keeper, Write
from protocol.messages import (
    SHUTTING_DOWN,
    KeeperHello,
    StreamDone,
    StreamHandled,
    StreamIn,
    StreamInEnd,
    StreamKeep,
    StreamOpen,
    StreamOut,
)

MSG, ERR = 0, 1


class Sent(list):
    def __call__(self, frontend, msg, frames):
        self.append((frontend, msg, list(frames)))

    def of(self, kind):
        return [(f, m, fr) for f, m, fr in self if isinstance(m, kind)]


def keeper(*frontends):
    sent = Sent()
    table = Keeper(sent, structlog.get_logger())
    for i, name in enumerate(frontends):
        table.hello(KeeperHello(name, 100 + i), now=0.0)
    return table, sent


def test_a_stream_goes_to_the_accepting_frontend_with_the_fewest_streams():
    table, sent = keeper("frontend.0", "frontend.1")
    a, b = table.open("peer", 0.0), table.open("peer", 0.0)
    assert {a.frontend, b.frontend} == {"frontend.0", "frontend.1"}
    table.hello(KeeperHello("frontend.1", 101, accepting=False), now=0.0)
    c = table.open("peer", 0.0)
    assert c.frontend == "frontend.0"
    opens = sent.of(StreamOpen)
    assert [m.stream for _, m, _ in opens] == [a.id, b.id, c.id]
    assert all(m.handled == 0 and m.markers == [] for _, m, _ in opens)


def test_messages_are_relayed_logged_and_read_no_further_than_the_window():
    table, sent = keeper("frontend.0")
    s = table.open("peer", 0.0)
    for i in range(WINDOW):
        assert table.may_read(s)
        table.received(s, MSG, b"step%d" % i)
    assert not table.may_read(s)  # the frontend holds WINDOW unhandled messages
    assert [fr for _, _, fr in sent.of(StreamIn)] == [[b"step%d" % i] for i in range(WINDOW)]
    stream, action = table.from_frontend("frontend.0", StreamOut(s.id, MSG, 1), [b"reply"])
    assert stream is s and action == Write(MSG, b"reply", handled=1)
    assert s.handled == 1 and table.may_read(s)
    table.from_frontend("frontend.0", StreamHandled(s.id, 2), [])
    assert s.handled == 2
    assert s.log == [(MSG, b"step%d" % i) for i in range(WINDOW)]


def test_a_reply_carries_when_its_message_was_read_and_the_compute_for_it():
    """The keeper times a step from its message read to the first frame of its reply (node_step_*):
    the Write names when its message arrived; a duplicate handled with no reply, a second frame of one
    reply and a reply to a message not read here (a push's) are not timed."""
    table, _ = keeper("frontend.0")
    s = table.open("peer", 0.0)
    for i, now in enumerate([10.0, 11.0, 12.0]):
        table.received(s, MSG, b"step%d" % i, now)
    _, first = table.from_frontend("frontend.0", StreamOut(s.id, MSG, 1, compute_us=700), [b"a"])
    assert (first.since, first.compute_us) == (10.0, 700)
    _, again = table.from_frontend("frontend.0", StreamOut(s.id, MSG, 1), [b"a2"])
    assert again.since == 0.0  # the same reply's next frame
    table.from_frontend("frontend.0", StreamHandled(s.id, 2), [])  # a duplicate: nothing to time
    _, third = table.from_frontend("frontend.0", StreamOut(s.id, MSG, 3, compute_us=5), [b"c"])
    assert third.since == 12.0
    _, pushed = table.from_frontend("frontend.0", StreamOut(s.id, MSG, 3, compute_us=9), [b"p"])
    assert pushed.since == 0.0 and not s.arrivals  # nothing left to match: the deque stays bounded


def test_a_frontend_that_does_not_hold_the_stream_is_ignored():
    table, _ = keeper("frontend.0", "frontend.1")
    s = table.open("peer", 0.0)
    other = "frontend.1" if s.frontend == "frontend.0" else "frontend.0"
    assert table.from_frontend(other, StreamOut(s.id, MSG, 5), [b"x"]) == (None, None)
    assert table.from_frontend(s.frontend, StreamOut(999, MSG, 5), [b"x"]) == (None, None)
    assert s.handled == 0


def test_a_dead_frontends_stream_is_handed_over_with_its_log_and_what_was_answered():
    table, sent = keeper("frontend.0", "frontend.1")
    s = table.open("peer", 0.0)
    first = s.frontend
    table.from_frontend(first, StreamKeep(s.id, 1000), [])
    table.received(s, MSG, b"open+step0")
    table.from_frontend(first, StreamOut(s.id, MSG, 1), [b"out0"])
    table.received(s, MSG, b"step1")  # in flight when the frontend dies
    ended = table.down(first, now=1.0)
    assert ended == {}
    second = s.frontend
    assert second is not None and second != first
    _, handover, frames = sent.of(StreamOpen)[-1]
    assert handover.stream == s.id and handover.handled == 1 and handover.markers == [MSG, MSG]
    assert frames == [b"open+step0", b"step1"]
    assert table.resumed == 1
    # the old process's late frames are ignored; the new one's are written
    assert table.from_frontend(first, StreamOut(s.id, MSG, 2), [b"late"]) == (None, None)
    assert table.from_frontend(second, StreamOut(s.id, MSG, 2), [b"out1"])[1] == Write(MSG, b"out1", handled=2)


def test_a_stream_waits_for_the_replacement_when_no_other_frontend_is_there():
    table, sent = keeper("frontend.0")
    s = table.open("peer", 0.0)
    table.from_frontend("frontend.0", StreamKeep(s.id, 1000), [])
    table.received(s, MSG, b"m0")
    table.down("frontend.0", now=1.0)
    assert s.frontend is None and not s.done
    table.received(s, MSG, b"m1")  # logged while nobody serves it
    assert table.overdue(now=5.0, limit=60.0) == {}
    table.hello(KeeperHello("frontend.0", 200), now=6.0)  # the replacement
    assert s.frontend == "frontend.0"
    _, handover, frames = sent.of(StreamOpen)[-1]
    assert frames == [b"m0", b"m1"] and handover.handled == 0


def test_a_waiting_stream_whose_log_outgrows_its_budget_ends_instead_of_being_handed_over_empty():
    """It was handed to the replacement with an empty log and the count of messages answered: the message
    read while it waited never reached a frontend, and the new one took the client's next message for one
    already answered. Nothing could take it over any more: it ends, as a stream not kept ends at once."""
    table, sent = keeper("frontend.0")
    s = table.open("peer", 0.0)
    table.from_frontend("frontend.0", StreamKeep(s.id, 10), [])
    table.received(s, MSG, b"m0")
    table.from_frontend("frontend.0", StreamOut(s.id, MSG, 1), [b"out0"])
    table.down("frontend.0", now=1.0)
    assert table.received(s, MSG, b"m1 is longer") == Close(
        FRONTEND_LOST.format(why="its messages exceeded the 10 bytes kept for it")
    )
    assert s.done
    opened = len(sent.of(StreamOpen))
    table.hello(KeeperHello("frontend.0", 200), now=2.0)  # the replacement takes nothing
    assert len(sent.of(StreamOpen)) == opened


def test_a_replacement_saying_hello_before_its_predecessors_death_is_known_takes_its_streams():
    table, sent = keeper("frontend.0")
    s = table.open("peer", 0.0)
    table.from_frontend("frontend.0", StreamKeep(s.id, 1000), [])
    table.received(s, MSG, b"m0")
    table.hello(KeeperHello("frontend.0", 999), now=1.0)  # a new pid under the same name
    assert s.frontend == "frontend.0" and sent.of(StreamOpen)[-1][2] == [b"m0"]
    assert table.down("frontend.0", now=2.0, pid=100) == {}  # the news of the old process that follows
    assert s.frontend == "frontend.0" and "frontend.0" in table.frontends  # ... changes nothing


def test_streams_not_kept_end_with_an_error_when_their_frontend_dies():
    table, _ = keeper("frontend.0", "frontend.1")
    unkept = table.open("peer", 0.0)
    table.from_frontend(unkept.frontend, StreamKeep(unkept.id, 0), [])
    over = table.open("peer", 0.0)
    table.from_frontend(over.frontend, StreamKeep(over.id, 10), [])
    table.received(over, MSG, b"x" * 11)
    assert not over.kept and over.log == [] and "exceeded the 10 bytes" in over.why_not_kept
    replied = table.open("peer", 0.0)
    table.from_frontend(replied.frontend, StreamOut(replied.id, ERR, 0), [b"an error"])
    ended = {}
    for name in ("frontend.0", "frontend.1"):
        ended.update(table.down(name, now=1.0))
    assert ended[unkept.id] == Close(FRONTEND_LOST.format(why="its frontend does not keep its history"))
    assert ended[over.id].error.startswith("the node's frontend that held this session stopped")
    assert ended[replied.id] == Close()  # its reply was complete: it only closes


def test_a_stream_waiting_too_long_for_a_frontend_ends():
    table, _ = keeper()
    s = table.open("peer", 0.0)
    assert s.frontend is None
    ended = table.overdue(now=61.0, limit=60.0)
    assert "no frontend took it within 60 s" in ended[s.id].error and s.done


def test_a_draining_node_refuses_new_streams_and_a_cut_input_is_told_to_the_frontend():
    table, sent = keeper("frontend.0")
    assert table.refusal() is None
    s = table.open("peer", 0.0)
    table.input_cut(s)
    assert sent.of(StreamInEnd)[-1][1].stream == s.id and not s.kept
    table.hello(KeeperHello("frontend.0", 100, accepting=False, draining=True), now=0.0)
    assert table.refusal() == SHUTTING_DOWN


def test_done_streams_are_counted_out():
    table, _ = keeper("frontend.0")
    s = table.open("peer", 0.0)
    table.from_frontend("frontend.0", StreamKeep(s.id, 100), [])
    table.received(s, MSG, b"abc")
    assert table.counts() == (1, 1, 3)
    assert table.from_frontend("frontend.0", StreamDone(s.id), [])[1] == Close()
    assert table.counts() == (0, 0, 0)
    table.gone(s)
    assert s.id not in table.streams
