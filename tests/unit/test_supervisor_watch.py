"""The supervisor's watch over its actors (node/supervisor/supervisor.py), with real child processes that
only sleep and a supervisor made of the methods under test: silence at startup, and a control message
whose handling fails."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import types

import structlog
from structlog.testing import CapturingLogger

from node.supervisor.processes import ActorProcess, ActorSpec, RestartIntensity
from node.supervisor.supervisor import STARTUP_SILENCE, Supervisor
from protocol.dht_records import ServerState
from protocol.messages import Heartbeat
from protocol.transport import Envelope


def supervisor(actors: dict, log=None) -> types.SimpleNamespace:
    sup = types.SimpleNamespace(
        config=types.SimpleNamespace(heartbeat_timeout=15, max_restarts=5, restart_window=60),
        drain_deadline=None,
        actors=actors,
        runtimes=["runtime.0"],
        log=log or structlog.get_logger(),
        stream_handlers={},
        exit_code=None,
        intensity=RestartIntensity(5, 60),
        send=lambda *args: True,
        metrics_totals=None,
    )
    for name in ("_check", "crashed_while_draining", "_died", "restart_allowed", "plan_published", "_receive"):
        setattr(sup, name, types.MethodType(getattr(Supervisor, name), sup))
    return sup


def sleeping_actors(names, started: float) -> dict:
    actors = {}
    for name in names:
        actor = ActorProcess(ActorSpec(name, "x"))
        actor.popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        actor.started_at = actor.last_heartbeat = started
        actors[name] = actor
    return actors


def test_actors_that_wait_for_the_plan_are_given_their_startup_allowance_from_it():
    """The actors start before the model is resolved and cannot speak before plan.json exists: a resolution
    of over STARTUP_SILENCE (another node holding the weight cache's lock) had every one killed as silent,
    and the restarts that followed made the node give up."""
    now = time.monotonic()
    actors = sleeping_actors(["announcer", "allocator", "runtime.0", "frontend.0"], now - STARTUP_SILENCE - 1)
    sup = supervisor(actors)
    try:
        sup.plan_published(now)
        for actor in actors.values():
            sup._check(actor, now + 1)
        assert all(actor.running for actor in actors.values()) and sup.exit_code is None
        for actor in actors.values():  # still silent a whole allowance after the plan: killed, as before
            sup._check(actor, now + STARTUP_SILENCE + 1)
        for actor in actors.values():
            actor.popen.wait(10)
        assert all(actor.popen.returncode == -9 for actor in actors.values())
    finally:
        for actor in actors.values():
            actor.popen.kill()
            actor.popen.wait()


def test_a_control_message_whose_handling_fails_does_not_stop_the_heartbeats():
    """Only undecodable messages were caught: any other exception in handling one ended the receiver for
    good, the heartbeats went unread, and every actor was killed as silent."""

    class Control:
        def __init__(self, envelopes):
            self.envelopes = list(envelopes)

        async def recv(self):
            if not self.envelopes:
                await asyncio.sleep(3600)
            return self.envelopes.pop(0)

    actors = sleeping_actors(["frontend.0"], 0.0)
    log = CapturingLogger()
    sup = supervisor(actors, log)
    failing = {"first": True}

    def on_message(name, actor, msg):
        if failing.pop("first", False):
            raise OSError(28, "No space left on device")
        Supervisor.on_message(sup, name, actor, msg)

    sup.on_message = on_message
    heartbeat = Heartbeat("frontend.0", pid=actors["frontend.0"].pid)
    sup.control = Control([Envelope(b"frontend.0", heartbeat, []), Envelope(b"frontend.0", heartbeat, [])])

    async def main():
        receiving = asyncio.get_running_loop().create_task(sup._receive())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if actors["frontend.0"].last_heartbeat > 0:
                break
        receiving.cancel()

    try:
        asyncio.run(main())
        assert actors["frontend.0"].last_heartbeat > 0
        assert "control message failed" in [call.args[0] for call in log.calls]
    finally:
        actors["frontend.0"].popen.kill()
        actors["frontend.0"].popen.wait()


def test_a_drain_begun_while_the_announcer_was_replaced_says_offline_once_it_is_back():
    """Its crash forgets what was announced; a stop then skipped OFFLINE (nothing to take back, it seemed),
    and the swarm went on sending new clients here through the whole drain."""
    announced = []
    sup = types.SimpleNamespace(
        actors={"announcer": types.SimpleNamespace(ready=True)},
        drain_deadline=time.monotonic() + 60,
        ever_announced=True,
        announced=None,  # the announcer was replaced: its successor was told nothing yet
        announce=announced.append,
        order_loads=lambda: None,
    )
    Supervisor._update_state(sup)
    assert announced == [ServerState.OFFLINE]
    sup.announced = ServerState.OFFLINE
    Supervisor._update_state(sup)
    assert announced == [ServerState.OFFLINE]  # once


def test_a_load_abandoned_by_one_move_does_not_pass_for_the_next_ones():
    """A load that outlived its move's timeout answered later, and its BlocksLoaded (other blocks) settled
    the next move's wait: the node would have switched to blocks it had not loaded."""
    from node.supervisor.moves import Moves
    from protocol.messages import BlocksLoaded

    async def main():
        moves = Moves(types.SimpleNamespace(log=CapturingLogger()))
        moves.loaded, moves.loading = asyncio.get_running_loop().create_future(), (4, 8)
        moves.on_loaded(BlocksLoaded(2, 6))  # the abandoned move's
        assert not moves.loaded.done()
        moves.on_loaded(BlocksLoaded(4, 8))
        return moves.loaded.result()

    assert asyncio.run(main()) == BlocksLoaded(4, 8)
