"""The probe's step timer (`python -m node.probe --follow`), fed events by hand."""

from __future__ import annotations

import json


def test_step_timer_waits_for_runtime_events_that_arrive_after_the_reply():
    """Each actor publishes on its own socket: the runtime's events of a step can reach the probe after
    the frontend's reply (or before the frontend's InferStep). The step is still timed in full, and
    steps are printed in order; one whose runtime events never come is printed after a grace period."""
    from node.probe import StepTimer
    from protocol.messages import ProbeEvent

    timer = StepTimer("abc")
    fe, rt = "frontend.0", "runtime.0"

    def ev(actor, t, direction, type_, req=-1, **fields):
        return ProbeEvent(actor, t, direction, type_, req=req, fields=fields)

    def step(t, req, runtime_first):
        frontend = [
            ev(fe, t, "in", "ClientStep"),
            ev(fe, t + 1, "out", "InferStep", req, handle=1, tensors=[["float32", [1, 3, 8]]]),
            ev(fe, t + 5, "in", "Result", req),
            ev(fe, t + 6, "out", "ClientReply"),
        ]
        runtime = [
            ev(rt, t + 2, "in", "InferStep", req, peer_actor=fe),
            ev(rt, t + 3, "run", "Round", steps=[[fe, req]]),
            ev(rt, t + 4, "out", "Result", req, peer_actor=fe),
        ]
        return runtime + frontend if runtime_first else frontend + runtime

    lines = []
    for e in step(0, 7, runtime_first=False):  # runtime events late: nothing printed until they are in
        lines += timer.feed(e, "abcdef", now=0.0)
        if e.type == "ClientReply":
            assert lines == []
    assert len(lines) == 1 and "?" not in lines[0] and "tokens=3" in lines[0], lines
    assert "to runtime 1000.00 ms" in lines[0] and "compute 1000.00 ms" in lines[0] and "total 6000.00 ms" in lines[0]
    for e in step(10, 8, runtime_first=True):  # runtime events early
        lines += timer.feed(e, "abcdef", now=0.0)
    assert len(lines) == 2 and lines[1].startswith("step 2 req=8") and "?" not in lines[1], lines
    lost = [e for e in step(20, 9, runtime_first=False) if e.actor == fe]  # the runtime's events never come
    following = step(30, 10, runtime_first=True)
    for e in lost + following:
        lines += timer.feed(e, "abcdef", now=0.0)
    assert len(lines) == 2  # step 4 is complete but waits behind step 3
    assert timer.next_due() == StepTimer.GRACE
    late = timer.due(StepTimer.GRACE + 0.1)
    assert [line.split(" req=")[0] for line in late] == ["step 3", "step 4"]
    assert "to runtime ?" in late[0] and "?" not in late[1]


def test_step_timer_adds_the_keepers_read_and_write_of_a_clients_step_but_not_of_a_push():
    """A client's step is timed from the stream keeper reading its message to the keeper writing the
    reply, matched by (stream, message number) whenever the keeper's events arrive; a step pushed by
    another server has no keeper parts and is timed from the frontend's side only."""
    from node.probe import StepTimer
    from protocol.messages import ProbeEvent

    timer = StepTimer("abc", as_json=True)
    fe, rt, kp = "frontend.0", "runtime.0", "keeper"

    def ev(actor, t, direction, type_, req=-1, **fields):
        return ProbeEvent(actor, t, direction, type_, req=req, fields=fields)

    def step(t, req, message=None):
        kept = {} if message is None else {"stream": 4, "message": message}
        return [
            ev(fe, t, "in", "ClientStep", **kept),
            ev(fe, t + 1, "out", "InferStep", req, handle=1, tensors=[["float32", [1, 1, 8]]]),
            ev(rt, t + 2, "in", "InferStep", req, peer_actor=fe),
            ev(rt, t + 3, "run", "Round", steps=[[fe, req]]),
            ev(rt, t + 4, "out", "Result", req, peer_actor=fe),
            ev(fe, t + 5, "in", "Result", req),
            ev(fe, t + 6, "out", "ClientReply", **kept),
        ]

    lines = []
    # message 2 of stream 4: the keeper's read comes before, its write after the frontend's reply
    lines += timer.feed(ev(kp, 9.5, "in", "ClientMessage", stream=4, message=2), "", now=0.0)
    for e in step(10, 7, message=2):
        lines += timer.feed(e, "abcdef", now=0.0)
    assert lines == []  # waits for the keeper's write
    lines += timer.feed(ev(kp, 16.25, "out", "ClientFrame", stream=4, handled=2, marker=0), "", now=0.0)
    lines += timer.feed(ev(kp, 16.5, "out", "ClientFrame", stream=4, handled=2, marker=0), "", now=0.0)  # 2nd frame
    assert len(lines) == 1, lines
    first = json.loads(lines[0])
    assert first["ms"]["keeper"] == 500.0 and first["ms"]["to client"] == 250.0
    assert first["ms"]["total"] == 6750.0 and abs(sum(first["ms"].values()) - 2 * 6750.0) < 1e-6
    # a pushed step: no keeper parts, and no wait for keeper events
    for e in step(20, 8):
        lines += timer.feed(e, "abcdef", now=0.0)
    assert len(lines) == 2, lines
    pushed = json.loads(lines[1])
    assert "keeper" not in pushed["ms"] and "to client" not in pushed["ms"] and pushed["ms"]["total"] == 6000.0
