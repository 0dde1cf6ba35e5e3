"""The probe's step timer (`python -m node.probe --follow`), fed events by hand."""

from __future__ import annotations


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
