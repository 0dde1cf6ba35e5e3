"""One run: a swarm under one rule (or a mix) with one seed, over the configured hours.

The population (arrival times, devices, networks, lifetimes, crash or leave) is drawn up front from
the seed alone, so each rule faces the same servers; the waits, the rule's shuffles and the clients
draw from their own generators.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Optional

from node.simulate.clients import REASONS, Clients
from node.simulate.config import Config, blocks_and_room, lifetime_draw
from node.simulate.events import Events
from node.simulate.rules import NodeRule, PetalsRule
from node.simulate.swarm import Dht, Server, Truth
from node.supervisor.placement import server_throughput
from protocol.dht_records import ServerState


@dataclass
class Arrival:
    at: float
    peer: str
    device: object
    network_rps: float
    relay: bool
    node: bool  # runs the node's rule in a mix
    stay: float
    crash: bool
    count: Optional[int] = None  # a scripted server (the loopback cross-check): blocks and throughput given
    throughput: Optional[float] = None


@dataclass
class Result:
    rule: str
    seed: int
    times: list = field(repr=False)
    fractions: list = field(repr=False)
    uncovered: float  # share of samples with a block that no ONLINE server serves
    moves: int
    undone: int
    server_hours: float
    settle_min: list = field(repr=False)  # per server joined after the warm-up: join -> its last move
    sessions: int
    refused: int
    broken: dict
    wall_s: float


def population(config: Config, seed: int) -> list[Arrival]:
    rng = random.Random(f"population {seed}")
    devices, weights = list(config.devices), [d.share for d in config.devices]
    low, high = config.network_mbps
    end, arrivals, t = config.hours * 3600, [], 0.0

    def draw(at: float) -> Arrival:
        mbps = low * (high / low) ** rng.random()
        return Arrival(
            at=at,
            peer=f"Qm{rng.getrandbits(64):016x}",
            device=rng.choices(devices, weights)[0],
            network_rps=mbps * 1e6 / (config.hidden_size * 16),  # PROTOCOL 5.2
            relay=rng.random() < config.relay_share,
            node=rng.random() < config.node_share,
            stay=lifetime_draw(config, rng),
            crash=rng.random() < config.crash_share,
        )

    for _ in range(config.servers):
        arrivals.append(draw(rng.uniform(0, config.ramp_min * 60)))
    rate = config.servers / (config.mean_lifetime_h * 3600)  # keeps the population steady
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            break
        arrivals.append(draw(t))
    return sorted(arrivals, key=lambda a: a.at)


class Simulation:
    def __init__(self, config: Config, rule: str, seed: int):
        self.config, self.rule_name, self.seed = config, rule, seed
        self.events = Events()
        self.rng = random.Random(f"waits {rule} {seed}")
        self.rule_rng = random.Random(f"rule {rule} {seed}")
        self.dht = Dht(config.total_blocks)
        self.truth = Truth(config.total_blocks)
        self.clients = Clients(self)
        self.rules = {"node": NodeRule(self), "petals": PetalsRule(self)}
        self.warmup = config.warmup_h * 3600
        self.end = config.hours * 3600
        self.servers: list[Server] = []
        self.undone = 0
        self.times: list[float] = []
        self.fractions: list[float] = []
        self.uncovered = 0

    def run(self) -> Result:
        started = time.perf_counter()
        for arrival in population(self.config, self.seed):
            self.events.at(arrival.at, self.arrive, arrival)
        self.events.at(self.warmup, self.sample)
        self.clients.start()
        self.events.run_until(self.end)
        return self.result(time.perf_counter() - started)

    # --- servers come and go -------------------------------------------------------------------

    def rule_of(self, arrival: Arrival) -> str:
        if self.rule_name == "mixed":
            return "node" if arrival.node else "petals"
        return self.rule_name

    def arrive(self, arrival: Arrival) -> None:
        count, free = blocks_and_room(self.config, arrival.device)
        info = {"forward_rps": arrival.device.forward_rps, "network_rps": arrival.network_rps}
        throughput = server_throughput(info, count, using_relay=arrival.relay)
        if arrival.count is not None:
            count, throughput = arrival.count, arrival.throughput
        server = Server(
            peer=arrival.peer,
            rule=self.rule_of(arrival),
            device=arrival.device.name,
            count=count,
            throughput=throughput,
            free_bytes=free,
            joined=self.events.now,
        )
        self.servers.append(server)
        self.truth.up(server, +1)
        self.events.at(arrival.stay, self.depart, server, arrival.crash, server=server)
        self.rules[server.rule].join(server)

    def depart(self, server: Server, crash: bool) -> None:
        now = self.events.now
        server.alive, server.left = False, now
        self.truth.up(server, -1)
        if crash:
            self.clients.interrupt(server, "crash", grace=0.0)
            if server.announced_at is not None:
                # refreshed every update period since its last announcement: the record lives on
                # `expiration` seconds after the last refresh
                since = (now - server.announced_at) % self.config.update_period_s
                lingers = self.config.expiration - since
                if self.config.dead_after_s is not None:  # the what-if: found dead by pings
                    lingers = min(lingers, self.config.dead_after_s)
                version = self.dht.main[server.peer][4]
                self.events.at(lingers, self.dht.expire, server.peer, version)
        else:
            self.rules[server.rule].leave(server)
            if server.announced_at is not None:
                self.announce(server, ServerState.OFFLINE)
                version = self.dht.main[server.peer][4]
                self.events.at(self.config.expiration, self.dht.expire, server.peer, version)
        self.truth.serve(server, None)
        server.epoch += 1  # its pending timers are void

    # --- what the rules call -------------------------------------------------------------------

    def announce(self, server: Server, state: ServerState, retire=None) -> None:
        server.state = state
        server.announced_at = self.events.now
        self.dht.publish(server.peer, state, server.blocks, server.throughput)
        if retire is not None:
            version = self.dht.retire(server.peer, retire)
            self.events.at(self.config.expiration, self.dht.expire, server.peer, version)

    def serve(self, server: Server, blocks) -> None:
        self.truth.serve(server, blocks)

    def moved(self, server: Server) -> None:
        server.moves.append(self.events.now)
        server.pending = True

    def landed(self, server: Server) -> None:
        """The server serves its range: a move that brought it back to a range it held was undone."""
        if server.pending:
            server.pending = False
            if server.blocks in server.held and self.events.now >= self.warmup:
                self.undone += 1
        if not server.held or server.held[-1] != server.blocks:
            server.held.append(server.blocks)

    # --- measuring -----------------------------------------------------------------------------

    def sample(self) -> None:
        self.times.append(self.events.now)
        self.fractions.append(self.truth.fraction())
        self.uncovered += self.truth.uncovered()
        self.events.at(self.config.sample_s, self.sample)

    def result(self, wall_s: float) -> Result:
        warm, end = self.warmup, self.end
        moves = sum(1 for s in self.servers for t in s.moves if t >= warm)
        hours = sum(max(0.0, min(s.left or end, end) - max(s.joined, warm)) for s in self.servers) / 3600
        settle = [((s.moves[-1] - s.joined) if s.moves else 0.0) / 60 for s in self.servers if s.joined >= warm]
        return Result(
            rule=self.rule_name,
            seed=self.seed,
            times=self.times,
            fractions=self.fractions,
            uncovered=self.uncovered / max(1, len(self.times)),
            moves=moves,
            undone=self.undone,
            server_hours=hours,
            settle_min=settle,
            sessions=self.clients.started,
            refused=self.clients.refused,
            broken={r: self.clients.broken[r] for r in REASONS},
            wall_s=wall_s,
        )
