"""Rolling reload (SIGHUP, `systemctl reload`): every actor replaced by a process running the code now on
disk, and no client sees an error.

Owned by the supervisor, which calls `request()` on SIGHUP. The choreography, one actor at a time:
- the runtime (its whole group with tensor parallelism) is stopped gracefully: what it holds is answered
  "restarting", the frontends keep those requests and every open session's history, and once the new
  runtime has loaded the blocks they rebuild the sessions' caches and send the requests again
  (node/frontend/session.py). The node stays ONLINE meanwhile: requests wait, none fails;
- the allocator, then the announcer: their replacements learn what they must (the grants, the state)
  as after a crash;
- each frontend in turn: a new one (a new name, frontend.K) tells the stream keeper it takes work first,
  then the old one that it takes none (new calls and streams go to the new one), serves its open streams
  and calls until they end or --drain_timeout passes, and exits (Retire); the inference sessions still
  open then are handed to another frontend by the stream keeper, and the calls asked of it, not cut.
The supervisor itself is not replaced, nor the stream keeper (procs/keeper.py: the sessions' streams live
in it, and would end with it): a change to their code needs a restart, which drains. Reloads are logged
("reload started", "reload done" with the code version) and counted (status.json, node_reloads_total).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from node.code_version import code_version
from node.supervisor.processes import ActorProcess, ActorSpec
from protocol.messages import PeerDown, Retire, Stop

if TYPE_CHECKING:
    from node.supervisor.supervisor import Supervisor

READY_TIMEOUT = 600.0  # a new runtime loads its blocks again: minutes for a large model from disk
STOP_GRACE = 2.0  # for the runtime, allocator and announcer: their work is taken over, not lost


class ReloadFailed(Exception):
    pass


class Reload:
    def __init__(self, sup: "Supervisor"):
        self.sup = sup
        self.running = False
        self.again = False  # a SIGHUP came during a reload: one more follows it
        self.count = 0  # reloads completed

    @property
    def log(self):
        return self.sup.log

    def request(self) -> None:
        if not self.sup.started or self.sup.moves.moving:
            self.log.warning("reload ignored: the node is starting or moving", started=self.sup.started)
            return
        if self.running:
            self.again = True
            self.log.info("reload requested during a reload: another follows it")
            return
        self.running = True
        self.sup.spawn_task(self.run())

    async def run(self) -> None:
        try:
            while True:
                self.again = False
                began = time.monotonic()
                code = code_version()
                self.log.info("reload started", code=code, supervisor_code=self.sup.code)
                self.sup.notifier.reloading()
                try:
                    await self.replace_runtime()
                    await self.replace("allocator")
                    await self.replace("announcer")
                    for name in sorted(n for n in self.sup.actors if n.startswith("frontend")):
                        await self.replace_frontend(name)
                except ReloadFailed as e:
                    self.log.error("reload failed", error=str(e), seconds=round(time.monotonic() - began, 1))
                else:
                    self.count += 1
                    self.log.info("reload done", code=code, seconds=round(time.monotonic() - began, 1))
                self.sup.write_status()
                self.sup.notifier.ready(f"ONLINE, reloaded {self.count} times")
                if not self.again or self.sup.stop_requested.is_set():
                    return
        finally:
            self.running = False

    # --- one actor (or the runtime group) ---------------------------------------------------------

    async def _stop(self, actors: list[ActorProcess]) -> None:
        """Stopped as planned: _check leaves them alone (respawn_at in the future) and counts no failure."""
        for actor in actors:
            actor.respawn_at = float("inf")
            actor.reloading = True
        for actor in actors:  # the leader first: the other ranks serve its last round
            if actor.running and not self.sup.send(actor.spec.name, Stop(STOP_GRACE)):
                actor.popen.terminate()
            deadline = time.monotonic() + STOP_GRACE + 3.0
            while actor.running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            actor.kill()
        for actor in actors:
            if actor.popen is not None:
                await asyncio.get_running_loop().run_in_executor(None, actor.popen.wait)
            actor.ready = False
            for other in list(self.sup.actors):
                if other not in (a.spec.name for a in actors):
                    self.sup.send(other, PeerDown(actor.spec.name))

    async def _wait_ready(self, actors: list[ActorProcess], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not all(a.ready for a in actors):
            if time.monotonic() > deadline or self.sup.stop_requested.is_set():
                raise ReloadFailed(f"{what} was not ready within {timeout:.0f} s")
            if any(not a.reloading for a in actors):  # it died on the way up: the usual restarts take over
                raise ReloadFailed(f"{what} failed to start with the new code; see its log")
            await asyncio.sleep(0.05)

    async def replace_runtime(self) -> None:
        ranks = [self.sup.actors[n] for n in self.sup.runtimes]
        await self._stop(ranks)
        if len(ranks) > 1:
            self.sup.new_group_generation()
        for rank in ranks:
            rank.respawn_at = time.monotonic()  # _check spawns it; _update_state orders the load
        await self._wait_ready(ranks, READY_TIMEOUT, "the new runtime")

    async def replace(self, name: str) -> None:
        actor = self.sup.actors[name]
        await self._stop([actor])
        if name == "announcer":
            self.sup.announced = self.sup.confirmed = None  # its successor is told the state again
        actor.respawn_at = time.monotonic()
        await self._wait_ready([actor], 120.0, f"the new {name}")

    async def replace_frontend(self, old_name: str) -> None:
        """The new frontend serves before the old one stops taking work: no call finds nobody."""
        sup = self.sup
        index = 1 + max(int(n.split(".")[1]) for n in sup.actors if n.startswith("frontend."))
        new = ActorProcess(ActorSpec(f"frontend.{index}", "procs.frontend"))
        new.reloading = True
        sup.actors[new.spec.name] = new
        new.spawn(sup.plan.run_dir)
        sup.write_status()
        try:
            await self._wait_ready([new], 120.0, f"the new {new.spec.name}")
        except ReloadFailed:
            new.respawn_at = float("inf")
            new.kill()
            sup.actors.pop(new.spec.name, None)
            raise
        old = sup.actors[old_name]
        timeout = sup.config.drain_seconds
        sup.stop_planned(old, Retire(timeout))
        deadline = time.monotonic() + timeout + 5.0  # its final errors leave within seconds of the timeout
        while old.running and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        clean = not old.running and old.popen.returncode == 0
        old.kill()
        sup.actors.pop(old_name, None)
        sup.forget_frontend(old_name, clean)
        self.log.info("frontend replaced", old=old_name, new=new.spec.name)
