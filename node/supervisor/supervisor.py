"""The supervisor: `python -m node.supervisor --model X [flags]`.

Owns: the configuration and the plan, the run directory, the p2pd daemon (the node's libp2p
  identity), and the process table of actors: the DHT announcer, the KV-cache allocator, the block
  runtime (with --tensor_parallel_devices, one per device: runtime.0 leads, runtime.K follows; they
  live and restart as one group) and `--num_handlers` network frontends.
Receives (ROUTER `control.sock`): Ready, Heartbeat, Fatal and Announced from actors; Measured from
  the runtime and SwarmView from the announcer (for node/supervisor/placement.py), SwarmMap (for the
  status page); SIGTERM/SIGINT;
  SIGHUP (a rolling reload onto the code now on disk: node/supervisor/reload.py).
Sends: Announce (the node's state) to the announcer; LoadBlocks to the runtime; Serve (the blocks)
  to frontends and the allocator; SwarmQuery; PeerDown/PeerUp when an actor is replaced; Stop on
  shutdown; SwarmMapQuery every 15 s while the status page is served. Writes RUN_DIR/status.json for
  operators and probes; with --metrics_port serves /metrics, / and /status.json
  (node/supervisor/status_server.py) from a timeline it samples once a second.

The node's state follows its actors: JOINING until the runtime, the allocator and a frontend are
ready, then ONLINE; JOINING again while the runtime is replaced; OFFLINE on the way out. The runtime
loads its blocks only once the announcer has stored a state (JOINING), as Petals servers do. Which
blocks, and how many, is decided first (node/supervisor/placement.py), from the runtime's measurement of its
device and the swarm the announcer reads; the same placement moves the node when the swarm is
unbalanced (OFFLINE, drain, runtime restarted on the new blocks, JOINING, ONLINE).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from typing import Optional

import msgspec
import zmq
import zmq.asyncio

from node.code_version import code_version
from node.supervisor import status_view
from node.supervisor.config import NodeConfig
from node.supervisor.moves import Moves
from node.supervisor.placement import Placement, PlacementError
from node.supervisor.processes import ActorProcess, RestartIntensity, backoff, new_group_store
from node.supervisor.reload import Reload
from node.supervisor.sd_notify import Notifier
from node.supervisor.timeline import Timeline
from protocol.dht_records import ServerState
from protocol.messages import (
    AllocatorStats,
    Announce,
    Announced,
    AnnouncerReady,
    BlocksLoaded,
    ControlToSupervisor,
    Fatal,
    FrontendReady,
    FrontendStats,
    Heartbeat,
    KeeperReady,
    LoadBlocks,
    Measured,
    Message,
    PeerDown,
    PeerUp,
    Ready,
    RuntimeStats,
    Serve,
    Stop,
    SwarmMap,
    SwarmMapQuery,
    SwarmView,
)
from protocol.plan import NodePlan, write_plan
from protocol.transport import AsyncChannel, BadMessage

TICK = 0.1
SWARM_MAP_PERIOD = 15.0  # seconds between reads of the swarm's models for the status page
STARTUP_SILENCE = 60.0  # longest an actor may take to send its first heartbeat
DRAIN_LOG_PERIOD = 10.0  # seconds between the log lines of a drain
DRAIN_EXIT_MARGIN = 5.0  # seconds a frontend may take past the drain's end to end its streams and exit
UNDRAINED_GRACE = 5.0  # seconds in-flight work gets when the node stops without a drain (a fatal error)


class Supervisor:
    def __init__(
        self, config: NodeConfig, plan: NodePlan, log, own_run_dir: bool, actors: dict[str, ActorProcess], daemon
    ):
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
        self.drain_deadline: Optional[float] = None  # time.monotonic() when a graceful stop's drain ends
        self.drain_began = 0.0
        self.next_drain_log = 0.0
        self.exit_code: Optional[int] = None
        self.started = False  # every actor has been ready once
        self.announced: Optional[int] = None  # last state sent to the announcer
        self.ever_announced = False  # whether the swarm may hold a record of ours (OFFLINE on the way out)
        self.reported: Optional[int] = None  # last state announced: status.json keeps it while the announcer restarts
        self.confirmed: Optional[int] = None  # last state the announcer stored
        self.state_changed = asyncio.Event()
        self.maddrs: list[str] = []
        self.stream_handlers: dict[str, tuple[str, list[str]]] = {}  # frontend -> (its socket, handler names)
        self.tasks: set[asyncio.Task] = set()
        self.placement = Placement(config, plan, self.log, lambda msg: self.send("announcer", msg))
        self.placing: Optional[asyncio.Task] = None
        self.moves = Moves(self)
        self.notifier = Notifier()  # systemd (Type=notify), when started by it
        self.metrics_server = None  # --metrics_port: node/supervisor/status_server.py (/metrics, /, /status.json)
        self.metrics_totals = None  # node/supervisor/metrics.py Totals, fed with every heartbeat
        self.timeline = Timeline()  # the status page's charts, sampled once a second
        self.next_sample = 0.0
        self.status_view: Optional[dict] = None  # what /status.json serves, rebuilt once a second
        self.swarm_map: Optional[tuple[float, SwarmMap]] = None  # the announcer's last map, for the page
        self.next_swarm_map = 0.0
        self.notified_ready = False
        self.next_stats_report = time.monotonic() + (config.stats_report_interval or 0.0)
        self.last_report: Optional[tuple[float, dict]] = None  # --stats_report_interval: when, and the counts then
        self.started_at = time.monotonic()
        self.code = code_version()  # what this process runs; a reload replaces every actor but this one
        self.reload = Reload(self)

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """The actors and p2pd were started before the plan existed; actors wait for plan.json."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
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
            self.plan_published(time.monotonic())
            self.maddrs = await self.daemon.visible_maddrs()
            if self.config.metrics_port is not None:
                from node.supervisor import metrics
                from node.supervisor.status_server import StatusServer

                self.metrics_totals = metrics.Totals()
                host, port = self.config.metrics_host, self.config.metrics_port
                try:
                    registry = metrics.registry(self.metrics_snapshot, self.metrics_totals)
                    self.metrics_server = StatusServer(host, port, registry, lambda: self.status_view)
                    self.log.info("metrics served", host=host, port=self.metrics_server.server_port)
                except OSError as e:  # the port is taken: say so and stop (_watch returns at once)
                    self.log.error("cannot serve metrics", host=host, port=port, error=str(e))
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
        if self.drain_deadline is None and not self.stop_requested.is_set():
            self.begin_drain()
            return
        if self.drain_deadline is not None:
            self.log.warning("second signal: stopping at once")
            self.cut_drain()
        self.stop_requested.set()

    def _on_reload(self) -> None:
        self.log.info("signal received", signal="SIGHUP")
        if not self.stop_requested.is_set() and self.drain_deadline is None:
            self.reload.request()

    async def _watch(self) -> None:
        while self.exit_code is None and not self.stop_requested.is_set():
            now = time.monotonic()
            for actor in self.actors.values():
                self._check(actor, now)
            if self.drain_deadline is not None and self.drained(now):
                break
            if not self.daemon.alive:
                self.log.error("p2pd died; the node cannot serve without its peer identity")
                self.exit_code = 1
                break
            self._update_state()
            if self.drain_deadline is None:  # systemd stops watching once told STOPPING=1
                self.notifier.watchdog(healthy=self.exit_code is None)
            if self.config.stats_report_interval and now >= self.next_stats_report:
                self.next_stats_report = now + self.config.stats_report_interval
                self.report_stats()
            if self.metrics_server is not None and now >= self.next_sample:
                self.next_sample = now + 1.0
                self.update_status_page(now)
            try:
                await asyncio.wait_for(self.stop_requested.wait(), TICK)
            except asyncio.TimeoutError:
                pass

    def plan_published(self, now: float) -> None:
        """The actors started before the plan existed and wait for plan.json before they can speak: their
        allowance for a first heartbeat starts now, not at their spawn (resolving the model may take
        minutes, e.g. while another node holds the weight cache's lock; they were all killed, and the node
        gave up)."""
        for actor in self.actors.values():
            if actor.running and actor.last_heartbeat <= actor.started_at:
                actor.started_at = actor.last_heartbeat = now

    def _check(self, actor: ActorProcess, now: float) -> None:
        if self.crashed_while_draining(actor, now):
            # its sessions are still being served: the keeper holds their streams for its replacement
            actor.respawn_at = None
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
                self.log.warning(
                    "actor silent; killing it",
                    actor=actor.spec.name,
                    pid=actor.pid,
                    silent_seconds=round(now - actor.last_heartbeat, 1),
                )
                actor.kill()
            return
        self._died(actor, now)

    def crashed_while_draining(self, actor: ActorProcess, now: float) -> bool:
        """A frontend told to drain that died of something else before the drain's end (its planned exit is
        code 0): like any crash, it is replaced, and its successor drains in its place (on_ready)."""
        return (
            self.drain_deadline is not None
            and now < self.drain_deadline
            and not self.stop_requested.is_set()
            and actor.spec.name.startswith("frontend")
            and actor.respawn_at == float("inf")
            and actor.popen is not None
            and not actor.running
            and actor.popen.returncode != 0
        )

    def _died(self, actor: ActorProcess, now: float) -> None:
        name = actor.spec.name
        actor.reloading = False  # a successor that dies on the way up is a failure like any other
        if name in self.runtimes and len(self.runtimes) > 1:
            self._restart_group(actor, now)
            return
        self.log.warning("actor died", actor=name, pid=actor.pid, how=actor.describe_exit(), was_ready=actor.ready)
        actor.ready = False
        for other in self.actors.values():
            if other is not actor:
                self.send(other.spec.name, PeerDown(name, actor.pid or 0))
        if name in self.stream_handlers:
            task = asyncio.get_running_loop().create_task(self._unregister(name, *self.stream_handlers.pop(name)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if name == "announcer":
            self.announced = self.confirmed = None  # its successor must be told the state again
        if not self.restart_allowed(now):
            return
        actor.restarts += 1
        actor.consecutive_failures += 1
        actor.respawn_at = now + backoff(actor.consecutive_failures)
        self.timeline.mark(time.time(), name, "restarted")

    def restart_allowed(self, now: float) -> bool:
        """Counts one restart; past --max_restarts within --restart_window the node gives up (OTP intensity)."""
        if self.intensity.allow(now):
            return True
        self.log.error(
            "too many restarts; giving up",
            max_restarts=self.config.max_restarts,
            window_seconds=self.config.restart_window,
        )
        self.exit_code = 1
        return False

    def _restart_group(self, dead: ActorProcess, now: float) -> None:
        """A rank is gone: the others cannot compute without it (their reductions would wait for it
        forever), so the whole group goes and comes back together, meeting at a new store. Frontends
        fail what they sent to runtime.0; the node is JOINING until the group has loaded again."""
        self.log.warning(
            "tensor-parallel rank died; restarting the group",
            actor=dead.spec.name,
            pid=dead.pid,
            how=dead.describe_exit(),
            ranks=len(self.runtimes),
        )
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
        if not self.restart_allowed(now):
            return
        dead.restarts += 1
        dead.consecutive_failures += 1
        self.timeline.mark(time.time(), dead.spec.name, "restarted with its group")
        self.new_group_generation()
        respawn_at = now + backoff(dead.consecutive_failures)
        for name in self.runtimes:
            self.actors[name].respawn_at = respawn_at

    def new_group_generation(self) -> None:
        self.group_generation += 1
        new_group_store(self.actors, self.plan.run_dir, self.group_generation)

    def _update_state(self) -> None:
        announcer = self.actors["announcer"]
        if self.drain_deadline is not None:  # OFFLINE until the end; a replaced runtime still loads
            if announcer.ready and self.ever_announced and self.announced != ServerState.OFFLINE:
                # the announcer was being replaced when the drain began: its successor says OFFLINE now,
                # or the swarm would go on sending new clients here through the whole drain
                self.announce(ServerState.OFFLINE)
            self.order_loads()
            return
        if not announcer.ready or self.moves.moving:
            return
        if not self.placement.placed:
            if self.placing is None:
                self.placing = self.spawn_task(self._place())
            return
        # an actor being replaced by a reload counts as serving: what waits on it is held, not failed
        serving = (
            all(self.actors[n].ready or self.actors[n].reloading for n in self.runtimes)
            and (self.actors["allocator"].ready or self.actors["allocator"].reloading)
            and any(a.ready for n, a in self.actors.items() if n.startswith("frontend"))
            and self.actors["keeper"].ready
        )
        if not self.started and all(a.ready for a in self.actors.values()):
            self.started = True
        desired = ServerState.ONLINE if (serving and self.started) else ServerState.JOINING
        if desired != self.announced:
            self.announce(desired)
        self.order_loads()

    def order_loads(self) -> None:
        """Each rank loads its shard once the swarm sees us JOINING (PROTOCOL 2.4), in a reload, or while
        draining (a runtime replaced then serves the open sessions; nobody new is sent here)."""
        for name in self.runtimes:
            runtime = self.actors[name]
            if (
                (self.confirmed == ServerState.JOINING or runtime.reloading or self.drain_deadline is not None)
                and runtime.running
                and not runtime.ready
                and not runtime.load_ordered
            ):
                runtime.load_ordered = self.send(
                    name, LoadBlocks(self.plan.start_block, self.plan.end_block, quant_type=self.plan.quant_type)
                )

    def announce(self, state: ServerState, retire=None) -> None:
        if self.drain_deadline is not None and state != ServerState.OFFLINE:
            return  # a move that was under way when the drain began: the node stays OFFLINE
        self.announced = self.reported = state
        self.ever_announced = True
        self.state_changed.clear()
        self.send(
            "announcer",
            Announce(int(state), self.plan.start_block, self.plan.end_block, retire=retire, **self.placement.numbers),
        )
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
            try:
                self.on_message(name, actor, envelope.msg)
            except Exception as e:  # a bug with one message must not leave every later heartbeat unread
                self.log.error("control message failed", actor=name, msg=type(envelope.msg).__name__, exc_info=e)

    def on_message(self, name: str, actor: ActorProcess, msg) -> None:
        if isinstance(msg, Heartbeat):
            actor.last_heartbeat = time.monotonic()
            actor.stats = msg.stats
            if self.metrics_totals is not None:
                self.metrics_totals.observe(name, msg.pid, msg.stats)
        elif isinstance(msg, Ready):
            if msg.pid != actor.pid:
                return  # a late message from a predecessor
            actor.last_heartbeat = time.monotonic()
            actor.ready = True
            actor.reloading = False
            actor.code = msg.code
            actor.consecutive_failures = 0
            self.log.info("actor ready", actor=name, pid=msg.pid, code=msg.code, **msgspec.structs.asdict(msg.detail))
            if actor.was_ready:
                for other in self.actors.values():
                    if other is not actor:
                        self.send(other.spec.name, PeerUp(name))
            actor.was_ready = True
            if isinstance(msg.detail, (FrontendReady, KeeperReady)) and msg.detail.stream_handlers:
                self.stream_handlers[name] = (msg.detail.stream_maddr, list(msg.detail.stream_handlers))
            elif isinstance(msg.detail, AnnouncerReady):
                self.placement.using_relay = msg.detail.using_relay
            self.write_status()
            if self.placement.placed and (name == "allocator" or name.startswith("frontend")):
                self.send(name, Serve(self.plan.start_block, self.plan.end_block))
            if self.drain_deadline is not None and name.startswith("frontend"):  # a crashed one's successor
                self.stop_planned(actor, Stop(max(0.0, self.drain_deadline - time.monotonic())))
        elif isinstance(msg, Measured):
            self.placement.on_measured(msg)
        elif isinstance(msg, SwarmView):
            self.placement.on_view(msg)
        elif isinstance(msg, SwarmMap):
            self.swarm_map = (time.time(), msg)
        elif isinstance(msg, BlocksLoaded):
            self.moves.on_loaded(msg)
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
        self.plan.throughput_mode = (
            "auto" if self.plan.throughput_mode != "fixed" else "fixed"
        )  # a restarted runtime reads the cache
        self.set_blocks(start, end)
        if self.placement.can_move:
            self.spawn_task(self.moves.balance())

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

    def forget_frontend(self, name: str, clean: bool) -> None:
        """A frontend retired by a reload is gone for good: what others held for it is freed."""
        for other in list(self.actors):
            self.send(other, PeerDown(name))
        handlers = self.stream_handlers.pop(name, None)
        if handlers is not None and not clean:  # it removed them itself, unless it was killed
            self.spawn_task(self._unregister(name, *handlers))
        self.write_status()

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
        """What node/supervisor/metrics.py exposes, read from its HTTP thread (stats are replaced, not mutated)."""
        return {
            "state": int(self.reported) if self.reported is not None else -1,
            "blocks": [self.plan.start_block, self.plan.end_block],
            "moves": self.placement.moves,
            "reloads": self.reload.count,
            "actors": {
                n: {"ready": a.ready, "restarts": a.restarts, "stats": a.stats} for n, a in list(self.actors.items())
            },
        }

    def update_status_page(self, now: float) -> None:
        """Once a second, for the status page: a timeline sample, the page's data, and now and then a new
        map of the swarm from the announcer (its reply lands in _receive)."""
        frontends = {n: a.stats for n, a in self.actors.items() if isinstance(a.stats, FrontendStats)}
        runtime, allocator = self.actors["runtime.0"], self.actors["allocator"]
        self.timeline.sample(
            time.time(),
            runtime.stats if isinstance(runtime.stats, RuntimeStats) and runtime.ready else None,
            runtime.pid,
            allocator.stats if isinstance(allocator.stats, AllocatorStats) and allocator.ready else None,
            frontends,
        )
        if now >= self.next_swarm_map and self.actors["announcer"].ready:
            self.next_swarm_map = now + SWARM_MAP_PERIOD
            self.send("announcer", SwarmMapQuery(int(now * 1000)))
        self.status_view = status_view.build(self)

    def state_name(self) -> str:
        if self.drain_deadline is not None:
            return "draining"
        return ServerState(self.reported).name.lower() if self.reported is not None else "starting"

    def report_stats(self) -> None:
        """--stats_report_interval: one event with what the node did since the last one."""
        runtime = self.actors["runtime.0"].stats_as(RuntimeStats)
        allocator = self.actors["allocator"].stats_as(AllocatorStats)
        frontends = [a.stats for a in self.actors.values() if isinstance(a.stats, FrontendStats)]
        counts = {
            "rounds": runtime.rounds,
            "busy_seconds": runtime.busy_seconds,
            "requests": sum(sum(s.calls.values()) for s in frontends),
            "errors": sum(sum(s.errors.values()) for s in frontends),
        }
        now = time.monotonic()
        since, before = self.last_report or (self.started_at, {})
        self.last_report = (now, counts)
        # since the last report; a counter that went back belongs to a replaced process, counting anew
        delta = {k: v - before.get(k, 0) if v >= before.get(k, 0) else v for k, v in counts.items()}
        self.log.info(
            "stats",
            seconds=round(now - since, 1),
            rounds=delta["rounds"],
            busy_share=round(delta["busy_seconds"] / max(now - since, 1e-9), 3),
            requests=delta["requests"],
            errors=delta["errors"],
            queue=runtime.queue,
            steps_in_progress=runtime.in_progress,
            requests_in_flight=sum(s.in_flight for s in frontends),
            sessions=allocator.sessions,
            cache_used_bytes=allocator.used_bytes,
            cache_capacity_bytes=allocator.capacity_bytes,
        )

    def write_status(self, state: Optional[str] = None) -> None:
        status = {
            "state": state or self.state_name(),
            "peer_id": self.plan.peer_id,
            "maddrs": self.maddrs,
            "supervisor_pid": os.getpid(),
            "dht_prefix": self.plan.dht_prefix,
            "blocks": [self.plan.start_block, self.plan.end_block],
            "moves": self.placement.moves,
            "metrics_port": self.metrics_server.server_port if self.metrics_server is not None else None,
            "code": self.code,
            "reloads": self.reload.count,
            "reloading": self.reload.running,
            "actors": {
                n: {"pid": a.pid, "ready": a.ready, "restarts": a.restarts, "code": a.code}
                for n, a in self.actors.items()
            },
            "updated": time.time(),
        }
        path = os.path.join(self.plan.run_dir, "status.json")
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(status, f)
            os.replace(path + ".tmp", path)
        except OSError as e:  # a full disk: status.json goes stale, the node serves on
            self.log.warning("cannot write status.json", error=str(e))

    # --- draining and shutdown ---------------------------------------------------------------

    def begin_drain(self) -> None:
        """The first SIGTERM or SIGINT: OFFLINE at once (new clients route elsewhere), and the frontends drain:
        they refuse new calls and serve every open session until its client closes it or --shutdown_grace
        ends. The other actors go on serving them (and are replaced if they die). Then the node stops."""
        grace = self.config.shutdown_grace
        self.drain_began = time.monotonic()
        self.drain_deadline = self.drain_began + grace
        self.next_drain_log = 0.0
        self.notifier.stopping("draining")
        self.log.info("draining: open sessions are served until they end", grace=grace)
        if self.actors["announcer"].ready and self.announced not in (None, ServerState.OFFLINE):
            self.announce(ServerState.OFFLINE)
        self.write_status()
        for name, actor in self.actors.items():
            if name.startswith("frontend"):
                self.stop_planned(actor, Stop(grace))

    def cut_drain(self) -> None:
        """A second signal: the frontends end what is still open now."""
        for name, actor in self.actors.items():
            if name.startswith("frontend") and actor.running:
                self.send(name, Stop(0.0))

    def drained(self, now: float) -> bool:
        """Whether every frontend is done; logs what the drain waits for every DRAIN_LOG_PERIOD seconds."""
        frontends = [  # a crashed one waiting for its successor is not done
            a
            for n, a in self.actors.items()
            if n.startswith("frontend") and (a.running or a.respawn_at not in (None, float("inf")))
        ]
        if not frontends:
            self.log.info("drained", seconds=round(now - self.drain_began, 1))
            return True
        if now > self.drain_deadline + DRAIN_EXIT_MARGIN:
            self.log.warning("frontends did not finish their drain in time; stopping them", frontends=len(frontends))
            return True
        if now >= self.next_drain_log:
            self.next_drain_log = now + DRAIN_LOG_PERIOD
            stats = [a.stats_as(FrontendStats) for a in frontends]
            self.log.info(
                "draining",
                sessions=sum(s.sessions for s in stats),
                requests_in_flight=sum(s.in_flight for s in stats),
                seconds_left=round(max(0.0, self.drain_deadline - now), 1),
            )
        return False

    async def _shutdown(self) -> None:
        """OFFLINE first, then frontends (they finish in-flight work), then everything else, then p2pd. After
        a drain the frontends are gone already; without one (a fatal error, a second signal) they get no
        more than a short grace."""
        began = time.monotonic()
        if self.drain_deadline is None:
            self.notifier.stopping()
        if self.actors["announcer"].ready and self.ever_announced and self.announced != ServerState.OFFLINE:
            self.announce(ServerState.OFFLINE)
            try:
                while self.confirmed != ServerState.OFFLINE:
                    await asyncio.wait_for(self.state_changed.wait(), 5)
                    self.state_changed.clear()
            except asyncio.TimeoutError:
                self.log.warning("OFFLINE not confirmed by the announcer")
        frontends = [a for n, a in self.actors.items() if n.startswith("frontend")]
        cut = self.stop_requested.is_set() and self.drain_deadline is not None
        await self._stop(frontends, 0.0 if cut else min(self.config.shutdown_grace, UNDRAINED_GRACE))
        await self._stop([self.actors["keeper"]], 2.0)  # after the frontends: it carries their last frames
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

    def stop_planned(self, actor: ActorProcess, msg: Message) -> None:
        """Stop an actor on purpose with `msg` (Stop, Retire; SIGTERM where it cannot be sent): its exit is not
        a failure, and nothing replaces it (_check leaves an actor whose respawn time never comes alone)."""
        actor.respawn_at = float("inf")
        if actor.running and not self.send(actor.spec.name, msg):
            actor.popen.terminate()

    async def _stop(self, actors: list[ActorProcess], grace: float) -> None:
        for actor in actors:
            self.stop_planned(actor, Stop(grace))
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
