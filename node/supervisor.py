"""The supervisor: `python -m node.supervisor --model X [flags]`.

Owns: the configuration and the plan, the run directory, the p2pd daemon (the node's libp2p
  identity), and the process table of actors: the DHT announcer, the KV-cache allocator, the block
  runtime (with --tensor_parallel_devices, one per device: runtime.0 leads, runtime.K follows; they
  live and restart as one group) and `--num_handlers` network frontends.
Receives (ROUTER `control.sock`): Ready, Heartbeat, Fatal and Announced from actors; Measured from
  the runtime and SwarmView from the announcer (for node/placement.py); SIGTERM/SIGINT.
Sends: Announce (the node's state) to the announcer; LoadBlocks to the runtime; Serve (the blocks)
  to frontends and the allocator; SwarmQuery; PeerDown/PeerUp when an actor is replaced; Stop on
  shutdown. Writes RUN_DIR/status.json for operators and probes.

The node's state follows its actors: JOINING until the runtime, the allocator and a frontend are
ready, then ONLINE; JOINING again while the runtime is replaced; OFFLINE on the way out. The runtime
loads its blocks only once the announcer has stored a state (JOINING), as Petals servers do. Which
blocks, and how many, is decided first (node/placement.py), from the runtime's measurement of its
device and the swarm the announcer reads; the same placement moves the node when the swarm is
unbalanced (OFFLINE, drain, runtime restarted on the new blocks, JOINING, ONLINE).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import sys
import time
from typing import Optional

import zmq
import zmq.asyncio

from node import logs
from node.config import NodeConfig, parse_config
from node.placement import Placement, PlacementError
from node.sd_notify import Notifier
from node.processes import TP_STORE_ENV, ActorProcess, ActorSpec, RestartIntensity, backoff
from protocol.dht_records import ServerState
from protocol.messages import (
    Announce,
    Announced,
    BlocksLoaded,
    ControlToSupervisor,
    DropBlocks,
    Fatal,
    Heartbeat,
    LoadBlocks,
    Measured,
    PeerDown,
    PeerUp,
    Ready,
    Serve,
    Stop,
    SwarmView,
)
from protocol.plan import NodePlan, write_plan
from protocol.transport import AsyncChannel, BadMessage

TICK = 0.1
STARTUP_SILENCE = 60.0  # longest an actor may take to send its first heartbeat


def actor_specs(num_handlers: int, tp_world: int = 1) -> list[ActorSpec]:
    specs = [
        ActorSpec("announcer", "procs.announcer"),
        ActorSpec("allocator", "procs.cache"),
        ActorSpec("runtime.0", "procs.runtime"),
    ]
    specs += [ActorSpec(f"runtime.{rank}", "procs.runtime_rank") for rank in range(1, tp_world)]
    specs += [ActorSpec(f"frontend.{i}", "procs.frontend") for i in range(num_handlers)]
    return specs


def tp_world(config: NodeConfig) -> int:
    return max(1, len(config.tensor_parallel_devices or ()))


def start_actors(config: NodeConfig, run_dir: str) -> dict[str, ActorProcess]:
    """Start every actor at once: each imports its libraries (seconds of CPU for torch) while the
    supervisor resolves the model and starts p2pd, then waits for RUN_DIR/plan.json."""
    actors = {spec.name: ActorProcess(spec) for spec in actor_specs(config.num_handlers, tp_world(config))}
    new_group_store(actors, run_dir, 0)
    for actor in actors.values():
        actor.spawn(run_dir)
    return actors


def new_group_store(actors: dict[str, ActorProcess], run_dir: str, generation: int) -> None:
    """Each incarnation of a tensor-parallel group meets at a store of its own (node/tp_group.py)."""
    for name in os.listdir(run_dir):
        if name.startswith("tp-store."):
            try:
                os.remove(os.path.join(run_dir, name))
            except OSError:
                pass
    for name, actor in actors.items():
        if name.startswith("runtime."):
            actor.env[TP_STORE_ENV] = os.path.join(run_dir, f"tp-store.{generation}")


class Supervisor:
    def __init__(self, config: NodeConfig, plan: NodePlan, log, own_run_dir: bool, actors: dict[str, ActorProcess], daemon):
        self.config = config
        self.plan = plan
        self.log = log.bind(blocks=[plan.start_block, plan.end_block], dht_prefix=plan.dht_prefix)
        self.own_run_dir = own_run_dir
        self.actors = actors
        self.runtimes = sorted((n for n in actors if n.startswith("runtime.")), key=lambda n: int(n.split(".")[1]))
        self.group_generation = 0  # incarnations of the tensor-parallel group (each meets at its own store)
        self.intensity = RestartIntensity(config.max_restarts, config.restart_window)
        self.daemon = daemon
        self.control: Optional[AsyncChannel] = None
        self.stop_requested = asyncio.Event()
        self.exit_code: Optional[int] = None
        self.started = False  # every actor has been ready once
        self.announced: Optional[int] = None  # last state sent to the announcer
        self.reported: Optional[int] = None  # last state announced: status.json keeps it while the announcer restarts
        self.confirmed: Optional[int] = None  # last state the announcer stored
        self.state_changed = asyncio.Event()
        self.maddrs: list[str] = []
        self.stream_handlers: dict[str, tuple[str, list[str]]] = {}  # frontend -> (its socket, handler names)
        self.tasks: set[asyncio.Task] = set()
        self.placement = Placement(config, plan, self.log, lambda msg: self.send("announcer", msg))
        self.placing: Optional[asyncio.Task] = None
        self.moving = False  # a rebalancing move is under way: it drives the state itself
        self.loaded: Optional[asyncio.Future] = None  # BlocksLoaded of a load-then-switch move
        self.notifier = Notifier()  # systemd (Type=notify), when started by it
        self.metrics_server = None  # --metrics_port: node/metrics.py
        self.metrics_totals = None  # node/metrics.py Totals, fed with every heartbeat
        self.notified_ready = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """The actors and p2pd were started before the plan existed; actors wait for plan.json."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a replacement actor takes over its predecessor's identity
        sock.bind(self.plan.endpoint("control.sock"))
        self.control = AsyncChannel(sock, ControlToSupervisor, router=True)
        receiver = loop.create_task(self._receive())
        try:
            self.plan.daemon_maddr = self.daemon.control_maddr
            self.plan.peer_id = self.daemon.peer_id
            write_plan(self.plan)
            self.maddrs = await self.daemon.visible_maddrs()
            if self.config.metrics_port is not None:
                from node import metrics

                self.metrics_totals = metrics.Totals()
                try:
                    self.metrics_server, _ = metrics.serve(self.config.metrics_port, self.metrics_snapshot, self.metrics_totals)
                    self.log.info("metrics served", port=self.metrics_server.server_port)
                except OSError as e:  # the port is taken: say so and stop (_watch returns at once)
                    self.log.error("cannot serve metrics", port=self.config.metrics_port, error=str(e))
                    self.exit_code = 1
            self.log.info("node starting", peer_id=self.plan.peer_id, maddrs=self.maddrs, run_dir=self.plan.run_dir)
            self.write_status()
            await self._watch()
        finally:
            await self._shutdown()
            receiver.cancel()
            sock.close(0)
            ctx.term()
        return self.exit_code or 0

    def _on_signal(self, sig: int) -> None:
        self.log.info("signal received", signal=signal.Signals(sig).name)
        self.stop_requested.set()

    async def _watch(self) -> None:
        while self.exit_code is None and not self.stop_requested.is_set():
            now = time.monotonic()
            for actor in self.actors.values():
                self._check(actor, now)
            if not self.daemon.alive:
                self.log.error("p2pd died; the node cannot serve without its peer identity")
                self.exit_code = 1
                break
            self._update_state()
            self.notifier.watchdog(healthy=self.exit_code is None)
            try:
                await asyncio.wait_for(self.stop_requested.wait(), TICK)
            except asyncio.TimeoutError:
                pass

    def _check(self, actor: ActorProcess, now: float) -> None:
        if actor.respawn_at is not None:
            if now >= actor.respawn_at:
                actor.spawn(self.plan.run_dir)
                self.log.info("actor restarted", actor=actor.spec.name, pid=actor.pid, restarts=actor.restarts)
                self.write_status()
            return
        if actor.running:
            # Until its first heartbeat an actor is still importing torch and friends (seconds on a
            # busy host): a short --heartbeat_timeout must not kill every actor before it can speak.
            heard = actor.last_heartbeat > actor.started_at
            limit = self.config.heartbeat_timeout if heard else max(self.config.heartbeat_timeout, STARTUP_SILENCE)
            if now - actor.last_heartbeat > limit:
                self.log.warning("actor silent; killing it", actor=actor.spec.name, pid=actor.pid,
                                 silent_seconds=round(now - actor.last_heartbeat, 1))
                actor.kill()
            return
        self._died(actor, now)

    def _died(self, actor: ActorProcess, now: float) -> None:
        name = actor.spec.name
        if name in self.runtimes and len(self.runtimes) > 1:
            self._restart_group(actor, now)
            return
        self.log.warning("actor died", actor=name, pid=actor.pid, how=actor.describe_exit(), was_ready=actor.ready)
        actor.ready = False
        for other in self.actors.values():
            if other is not actor:
                self.send(other.spec.name, PeerDown(name))
        if name in self.stream_handlers:
            task = asyncio.get_running_loop().create_task(self._unregister(name, *self.stream_handlers.pop(name)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if name == "announcer":
            self.announced = self.confirmed = None  # its successor must be told the state again
        if not self.intensity.allow(now):
            self.log.error(
                "too many restarts; giving up",
                max_restarts=self.config.max_restarts,
                window_seconds=self.config.restart_window,
            )
            self.exit_code = 1
            return
        actor.restarts += 1
        actor.consecutive_failures += 1
        actor.respawn_at = now + backoff(actor.consecutive_failures)

    def _restart_group(self, dead: ActorProcess, now: float) -> None:
        """A rank is gone: the others cannot compute without it (their reductions would wait for it
        forever), so the whole group goes and comes back together, meeting at a new store. Frontends
        fail what they sent to runtime.0; the node is JOINING until the group has loaded again."""
        self.log.warning("tensor-parallel rank died; restarting the group", actor=dead.spec.name, pid=dead.pid,
                         how=dead.describe_exit(), ranks=len(self.runtimes))
        for name in self.runtimes:
            rank = self.actors[name]
            if rank.running:
                rank.kill()
                try:
                    rank.popen.wait(timeout=5)
                except Exception:
                    pass
            rank.ready = False
            for other in self.actors:
                if other not in self.runtimes:
                    self.send(other, PeerDown(name))
        if not self.intensity.allow(now):
            self.log.error("too many restarts; giving up", max_restarts=self.config.max_restarts,
                           window_seconds=self.config.restart_window)
            self.exit_code = 1
            return
        dead.restarts += 1
        dead.consecutive_failures += 1
        self._new_group_generation()
        respawn_at = now + backoff(dead.consecutive_failures)
        for name in self.runtimes:
            self.actors[name].respawn_at = respawn_at

    def _new_group_generation(self) -> None:
        self.group_generation += 1
        new_group_store(self.actors, self.plan.run_dir, self.group_generation)

    def _update_state(self) -> None:
        announcer = self.actors["announcer"]
        if not announcer.ready or self.moving:
            return
        if not self.placement.placed:
            if self.placing is None:
                self.placing = self.spawn_task(self._place())
            return
        serving = (
            all(self.actors[n].ready for n in self.runtimes)
            and self.actors["allocator"].ready
            and any(a.ready for n, a in self.actors.items() if n.startswith("frontend"))
        )
        if not self.started and all(a.ready for a in self.actors.values()):
            self.started = True
        desired = ServerState.ONLINE if (serving and self.started) else ServerState.JOINING
        if desired != self.announced:
            self.announce(desired)
        for name in self.runtimes:  # each rank loads its shard
            runtime = self.actors[name]
            if self.confirmed == ServerState.JOINING and runtime.running and not runtime.ready and not runtime.load_ordered:
                runtime.load_ordered = self.send(name, LoadBlocks(self.plan.start_block, self.plan.end_block))

    def announce(self, state: ServerState, retire=None) -> None:
        self.announced = self.reported = state
        self.state_changed.clear()
        self.send("announcer", Announce(int(state), self.plan.start_block, self.plan.end_block, retire=retire, **self.placement.numbers))
        self.log.info("state", state=state.name)
        self.write_status()
        status = f"{state.name} blocks {self.plan.start_block}:{self.plan.end_block} peer {self.plan.peer_id}"
        if state == ServerState.ONLINE and not self.notified_ready:
            self.notified_ready = self.notifier.ready(status)
        else:
            self.notifier.status(status)

    # --- receiving ---------------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            try:
                envelope = await self.control.recv()
            except BadMessage as e:
                self.log.warning("bad control message", reason=e.reason)
                continue
            name = envelope.sender.decode(errors="replace")
            actor = self.actors.get(name)
            if actor is None:
                self.log.warning("message from an unknown actor", actor=name)
                continue
            msg = envelope.msg
            if isinstance(msg, Heartbeat):
                actor.last_heartbeat = time.monotonic()
                actor.stats = msg.stats
                if self.metrics_totals is not None:
                    self.metrics_totals.observe(name, msg.pid, msg.stats)
            elif isinstance(msg, Ready):
                if msg.pid != actor.pid:
                    continue  # a late message from a predecessor
                actor.last_heartbeat = time.monotonic()
                actor.ready = True
                actor.consecutive_failures = 0
                self.log.info("actor ready", actor=name, pid=msg.pid, **msg.detail)
                if actor.was_ready:
                    for other in self.actors.values():
                        if other is not actor:
                            self.send(other.spec.name, PeerUp(name))
                actor.was_ready = True
                if "stream_maddr" in msg.detail:
                    self.stream_handlers[name] = (msg.detail["stream_maddr"], list(msg.detail.get("stream_handlers", ())))
                self.write_status()
                if name == "announcer":
                    self.placement.using_relay = bool(msg.detail.get("using_relay", False))
                if self.placement.placed and (name == "allocator" or name.startswith("frontend")):
                    self.send(name, Serve(self.plan.start_block, self.plan.end_block))
            elif isinstance(msg, Measured):
                self.placement.on_measured(msg)
            elif isinstance(msg, SwarmView):
                self.placement.on_view(msg)
            elif isinstance(msg, BlocksLoaded):
                if self.loaded is not None and not self.loaded.done():
                    self.loaded.set_result(msg)
            elif isinstance(msg, Fatal):
                self.log.error("actor cannot work; stopping the node", actor=name, reason=msg.reason)
                self.exit_code = 1
            elif isinstance(msg, Announced):
                self.confirmed = msg.state
                self.log.info("announced", state=ServerState(msg.state).name, ok=msg.ok)
                self.state_changed.set()
                if not msg.ok:
                    self.log.warning("announcement incomplete", state=ServerState(msg.state).name, error=msg.error)

    # --- placement ---------------------------------------------------------------------------

    def spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _place(self) -> None:
        try:
            start, end = await self.placement.place()
        except (PlacementError, ValueError, asyncio.TimeoutError) as e:
            self.log.error("cannot place the node", error=str(e) or repr(e))
            self.exit_code = 1
            return
        if self.plan.throughput_mode == "dry_run":
            numbers = {**self.placement.numbers, "num_blocks": self.placement.count}
            print(json.dumps(numbers), flush=True)
            self.log.info("throughput measured (dry run)", **numbers)
            self.exit_code = 0
            self.stop_requested.set()
            return
        self.plan.throughput_mode = "auto" if self.plan.throughput_mode != "fixed" else "fixed"  # a restarted runtime reads the cache
        self.set_blocks(start, end)
        if self.placement.can_move:
            self.spawn_task(self._balance())

    def set_blocks(self, start: int, end: int) -> None:
        """The node's blocks are now [start, end): the plan (read by restarted actors) and live actors."""
        self.plan.start_block, self.plan.end_block = start, end
        write_plan(self.plan)
        self.log = self.log.bind(blocks=[start, end])
        self.placement.log = self.log
        for name in self.actors:
            if name != "announcer":
                self.send(name, Serve(start, end))
        self.write_status()

    async def _balance(self) -> None:
        """Balance checks at random intervals while ONLINE; a persistent imbalance moves the node."""
        while True:
            await asyncio.sleep(self.placement.next_check_in())
            if self.moving or self.confirmed != ServerState.ONLINE:
                continue
            try:
                target = await self.placement.check_balance(self.plan.peer_id, (self.plan.start_block, self.plan.end_block))
            except (PlacementError, asyncio.TimeoutError) as e:
                self.log.warning("balance check failed", error=str(e) or repr(e))
                continue
            if target is not None:
                await self._move(*target)

    def room_to_load_first(self, start: int, end: int) -> bool:
        """Whether the blocks the move adds fit beside the current ones (free memory, less the margin)."""
        if len(self.runtimes) > 1:
            return False  # a group restarts on its new blocks (its ranks cannot load beside serving in step)
        old = range(self.plan.start_block, self.plan.end_block)
        added = sum(1 for i in range(start, end) if i not in old)
        free = self.actors["runtime.0"].stats.get("free_memory")
        report = self.placement.measured
        if free is None or report is None:
            return False
        return added * report.block_bytes <= free * (1.0 - self.config.memory_margin)

    async def _move(self, start: int, end: int) -> None:
        if self.room_to_load_first(start, end):
            await self._switch(start, end)
        else:
            await self._drain_and_restart(start, end)

    async def _switch(self, start: int, end: int) -> None:
        """Load-then-switch: the runtime loads the new blocks while it serves the old ones; then the
        node announces the new range ONLINE (the old one OFFLINE) at once, old sessions finish on the
        old blocks (bounded by --drain_timeout), and only then are those freed. No session is lost."""
        old = (self.plan.start_block, self.plan.end_block)
        self.log.info("loading blocks before switching", old=list(old), target=[start, end])
        self.moving = True
        try:
            self.loaded = asyncio.get_running_loop().create_future()
            if not self.send("runtime.0", LoadBlocks(start, end)):
                return
            try:
                loaded = await asyncio.wait_for(self.loaded, self.config.request_timeout)
            except asyncio.TimeoutError:
                loaded = None
            if loaded is None or not loaded.ok:
                self.log.warning("move abandoned: the new blocks did not load", error=getattr(loaded, "error", "timeout"))
                self.send("runtime.0", DropBlocks(*old))
                return
            target = await self._still_wanted(old, (start, end))
            if target is None:
                self.send("runtime.0", DropBlocks(*old))
                return
            self.set_blocks(start, end)
            self.announce(ServerState.ONLINE, retire=list(old))
            await asyncio.sleep(1.5)  # a node that switched at the same moment shows up now
            if await self._switched_together(old, (start, end)):
                self.log.info("another node took the same blocks at the same time; switching back", blocks=list(old))
                self.set_blocks(*old)
                self.announce(ServerState.ONLINE, retire=[start, end])
                self.send("runtime.0", DropBlocks(*old))
                return
            await self._drain_outside(self.config.drain_timeout)
            self.send("runtime.0", DropBlocks(start, end))
            self.placement.moves += 1
            self.log.info("moved", old=list(old), blocks=[start, end], moves=self.placement.moves)
            self.write_status()
        finally:
            self.moving = False

    async def _still_wanted(self, old: tuple[int, int], target: tuple[int, int]):
        try:
            return await self.placement.confirm_switch(self.plan.peer_id, old, target)
        except (PlacementError, asyncio.TimeoutError) as e:
            self.log.warning("cannot confirm the move; staying", error=str(e) or repr(e))
            return None

    async def _switched_together(self, old: tuple[int, int], new: tuple[int, int]) -> bool:
        try:
            return await self.placement.switched_together(self.plan.peer_id, old, new)
        except (PlacementError, asyncio.TimeoutError):
            return False

    async def _drain_outside(self, timeout: float) -> None:
        """Wait until no session uses blocks outside the announced range, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        await asyncio.sleep(min(timeout, 1.5))
        while time.monotonic() < deadline and self.actors["runtime.0"].stats.get("sessions_outside"):
            await asyncio.sleep(0.2)

    async def _drain_and_restart(self, start: int, end: int) -> None:
        """OFFLINE on the old blocks, let open sessions finish (bounded), restart the runtime on the
        new blocks; the usual JOINING -> LoadBlocks -> ONLINE sequence follows."""
        old = (self.plan.start_block, self.plan.end_block)
        self.log.info("leaving blocks", old=list(old), target=[start, end])
        self.moving = True
        try:
            self.announce(ServerState.OFFLINE)
            drained = await self._drain(self.config.drain_timeout)
            try:
                confirmed = await self.placement.confirm_move(self.plan.peer_id, old, (start, end))
            except (PlacementError, asyncio.TimeoutError) as e:
                self.log.warning("cannot confirm the move; staying", error=str(e) or repr(e))
                confirmed = None
            if confirmed is None:
                self.log.info("move cancelled: the old blocks are the best place now", blocks=list(old))
                self.announced = None  # ONLINE again on the old blocks, sessions never lost
                return
            start, end = confirmed
            self.placement.moves += 1
            self.log.info("old blocks drained" if drained else "drain timed out; ending open sessions", old=list(old))
            ranks = [self.actors[n] for n in self.runtimes]
            for runtime in ranks:
                runtime.respawn_at = float("inf")  # a planned restart: not a failure, no backoff
                runtime.stopping = True
            if ranks[0].running and not self.send("runtime.0", Stop(0.0)):
                ranks[0].popen.terminate()
            deadline = time.monotonic() + 5.0
            while ranks[0].running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for runtime in ranks:
                runtime.kill()
                runtime.ready = False
                for name in self.actors:
                    if name not in self.runtimes:
                        self.send(name, PeerDown(runtime.spec.name))
            self.set_blocks(start, end)
            if len(ranks) > 1:
                self._new_group_generation()
            for runtime in ranks:
                runtime.respawn_at = time.monotonic()  # _check spawns it with the new plan
            self.announced = None  # JOINING on the new blocks next
        finally:
            self.moving = False

    async def _drain(self, timeout: float) -> bool:
        """Wait until no session holds cache and no task is queued, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        await asyncio.sleep(min(timeout, 1.5))  # the next heartbeats show who came in before OFFLINE
        while time.monotonic() < deadline:
            allocator, runtime = self.actors["allocator"].stats, self.actors["runtime.0"].stats
            if not allocator.get("sessions") and not runtime.get("queue") and not runtime.get("in_progress"):
                return True
            await asyncio.sleep(0.2)
        return False

    async def _unregister(self, name: str, stream_maddr: str, handlers: list[str]) -> None:
        try:
            await self.daemon.remove_stream_handlers(stream_maddr, handlers)
            self.log.info("stream handlers of a dead actor removed", actor=name, socket=stream_maddr)
        except Exception as e:
            self.log.warning("cannot remove the stream handlers of a dead actor", actor=name, error=repr(e))

    # --- sending -----------------------------------------------------------------------------

    def send(self, name: str, msg) -> bool:
        try:
            self.control.send(msg, to=name.encode())
            return True
        except zmq.ZMQError:
            return False  # not connected (dead or still starting): it learns the state when ready

    def metrics_snapshot(self) -> dict:
        """What node/metrics.py exposes, read from its HTTP thread (stats dicts are replaced, not mutated)."""
        return {
            "state": int(self.reported) if self.reported is not None else -1,
            "blocks": [self.plan.start_block, self.plan.end_block],
            "moves": self.placement.moves,
            "actors": {n: {"ready": a.ready, "restarts": a.restarts, "stats": a.stats} for n, a in list(self.actors.items())},
        }

    def write_status(self, state: Optional[str] = None) -> None:
        if state is None:
            state = ServerState(self.reported).name.lower() if self.reported is not None else "starting"
        status = {
            "state": state,
            "peer_id": self.plan.peer_id,
            "maddrs": self.maddrs,
            "supervisor_pid": os.getpid(),
            "dht_prefix": self.plan.dht_prefix,
            "blocks": [self.plan.start_block, self.plan.end_block],
            "moves": self.placement.moves,
            "metrics_port": self.metrics_server.server_port if self.metrics_server is not None else None,
            "actors": {
                n: {"pid": a.pid, "ready": a.ready, "restarts": a.restarts} for n, a in self.actors.items()
            },
            "updated": time.time(),
        }
        path = os.path.join(self.plan.run_dir, "status.json")
        with open(path + ".tmp", "w") as f:
            json.dump(status, f)
        os.replace(path + ".tmp", path)

    # --- shutdown ----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """OFFLINE first, then frontends (they finish in-flight work), then everything else, then p2pd."""
        began = time.monotonic()
        self.notifier.stopping()
        if self.actors["announcer"].ready and self.announced is not None:
            self.announce(ServerState.OFFLINE)
            try:
                while self.confirmed != ServerState.OFFLINE:
                    await asyncio.wait_for(self.state_changed.wait(), 5)
                    self.state_changed.clear()
            except asyncio.TimeoutError:
                self.log.warning("OFFLINE not confirmed by the announcer")
        frontends = [a for n, a in self.actors.items() if n.startswith("frontend")]
        await self._stop(frontends, self.config.shutdown_grace)
        await self._stop([self.actors["runtime.0"]], 2.0)  # the leader first: the other ranks serve its drain
        await self._stop([self.actors[n] for n in self.runtimes[1:]], 2.0)
        await self._stop([self.actors["allocator"], self.actors["announcer"]], 2.0)
        if self.daemon is not None:
            await self.daemon.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.write_status("stopped")
        self.log.info("node stopped", seconds=round(time.monotonic() - began, 2), exit_code=self.exit_code or 0)
        self._clean_run_dir()

    async def _stop(self, actors: list[ActorProcess], grace: float) -> None:
        for actor in actors:
            actor.respawn_at = None
            if actor.running:
                actor.stopping = True
                if not self.send(actor.spec.name, Stop(grace)):
                    actor.popen.terminate()
        deadline = time.monotonic() + grace + 3.0
        while any(a.running for a in actors) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for actor in actors:
            if actor.running:
                self.log.warning("actor did not stop in time; killing it", actor=actor.spec.name)
                actor.kill()
                actor.popen.wait()

    def _clean_run_dir(self) -> None:
        if self.own_run_dir:
            shutil.rmtree(self.plan.run_dir, ignore_errors=True)
            return
        for entry in os.listdir(self.plan.run_dir):
            if entry.endswith(".sock"):
                try:
                    os.remove(os.path.join(self.plan.run_dir, entry))
                except OSError:
                    pass


def prepare_run_dir(config: NodeConfig) -> tuple[str, bool]:
    from node.resolve import default_run_dir

    own = config.run_dir is None
    run_dir = os.path.abspath(config.run_dir or default_run_dir())
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    status_path = os.path.join(run_dir, "status.json")
    if os.path.exists(status_path):
        try:
            with open(status_path) as f:
                status = json.load(f)
            pid = status.get("supervisor_pid")
            if status.get("state") != "stopped" and pid and pid != os.getpid():
                os.kill(pid, 0)
                usage_error(f"argument --run_dir: {run_dir} is used by a running node (pid {pid})")
        except (OSError, ValueError):
            pass  # a stale run directory from a node that is gone
    for stale in ("plan.json", "plan.json.tmp"):  # actors start before the new plan is written
        if os.path.exists(os.path.join(run_dir, stale)):
            os.remove(os.path.join(run_dir, stale))
    longest = os.path.join(run_dir, "probe.frontend.999.sock")
    if len(longest) > 100:
        usage_error(f"argument --run_dir: {run_dir} is too long for unix sockets")
    return run_dir, own


def usage_error(message: str) -> None:
    sys.stderr.write(f"python -m node.supervisor: error: {message}\n")
    sys.exit(2)


def raise_file_limit(wanted: int, log) -> None:
    if wanted <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        log.info("raised the open file limit", old=soft, new=new)


def main(argv: Optional[list[str]] = None) -> None:
    config = parse_config(argv)
    log = logs.setup("supervisor", config.log_level, config.log_format)
    run_dir, own = prepare_run_dir(config)
    raise_file_limit(config.increase_file_limit, log)
    actors = start_actors(config, run_dir)
    code = asyncio.run(boot(config, run_dir, own, actors, log))
    logs.exit_now(code)


async def boot(config: NodeConfig, run_dir: str, own: bool, actors: dict[str, ActorProcess], log) -> int:
    """Resolve the model (seconds of imports) while p2pd starts, then supervise."""
    from node.hivemind_light import install

    install()  # the supervisor needs hivemind's P2P, not its torch-based parts
    from node.daemon import DaemonError, start_daemon
    from node.resolve import ResolveError, resolve_in_child

    daemon = asyncio.get_running_loop().create_task(start_daemon(config, run_dir, log))
    try:
        plan = await resolve_in_child(config, run_dir)
    except ResolveError as e:
        for actor in actors.values():
            actor.kill()
        try:
            await (await daemon).stop()
        except DaemonError:
            pass
        if e.usage:
            usage_error(str(e))
        log.error("cannot resolve the model", error=str(e))
        return 1
    logs.quiet_hivemind()
    try:
        started = await daemon
    except DaemonError as e:
        log.error("cannot start p2pd", error=str(e))
        for actor in actors.values():
            actor.kill()
        return 1
    return await Supervisor(config, plan, log, own, actors, started).run()


if __name__ == "__main__":
    main()
