"""Clients: inference sessions that arrive at random, each on a route of servers through the model.

A route is built on what is really served (a client whose route names a dead record fails over to
another server before its session starts, so only live ONLINE servers are kept). A session is broken
when a server on its route stops serving it: a crash, a leave, a move. A server that drains (the node
stopping or moving) lets a session finish if it ends within the grace, and breaks it at the grace
otherwise. A broken session is counted once and not followed further (its client would fail over).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.simulate.simulation import Simulation
    from node.simulate.swarm import Server

REASONS = ("crash", "leave", "move")


class Clients:
    def __init__(self, sim: "Simulation"):
        self.sim = sim
        self.rng = random.Random(f"clients {sim.rule_name} {sim.seed}")
        self.rate = sim.config.sessions_per_hour / 3600
        self.mean = sim.config.session_min * 60
        self.open: dict[int, tuple[list, float, bool]] = {}  # id -> (route, end, counted)
        self.next_id = 0
        self.started = self.refused = self.completed = 0
        self.broken = dict.fromkeys(REASONS, 0)

    def start(self) -> None:
        if self.rate > 0:
            self.sim.events.at(self.rng.expovariate(self.rate), self.arrive)

    def arrive(self) -> None:
        self.sim.events.at(self.rng.expovariate(self.rate), self.arrive)
        counted = self.sim.events.now >= self.sim.warmup
        route = self.route()
        if route is None:
            self.refused += counted
            return
        self.started += counted
        sid, self.next_id = self.next_id, self.next_id + 1
        end = self.sim.events.now + self.rng.expovariate(1 / self.mean)
        self.open[sid] = (route, end, counted)
        for server in route:
            server.sessions.add(sid)
        self.sim.events.at(end - self.sim.events.now, self.finish, sid)

    def route(self):
        """From the first block to the last, each hop a random server among those serving the next block."""
        truth, total, route, block = self.sim.truth, self.sim.config.total_blocks, [], 0
        while block < total:
            candidates = truth.covering[block]
            if not candidates:
                return None
            server = self.rng.choice(list(candidates))
            route.append(server)
            block = truth.serving[server][1]
        return route

    def finish(self, sid: int) -> None:
        session = self.open.pop(sid, None)
        if session is None:
            return
        self.completed += session[2]
        for server in session[0]:
            server.sessions.discard(sid)

    def interrupt(self, server: "Server", reason: str, grace: float) -> float:
        """The server stops serving its sessions, giving them `grace` seconds; returns how long the
        last of those that finish in time still runs (what a draining server waits for)."""
        now, longest = self.sim.events.now, 0.0
        for sid in list(server.sessions):
            route, end, counted = self.open[sid]
            if end - now <= grace:
                longest = max(longest, end - now)
            elif grace > 0:
                self.sim.events.at(grace, self.break_, sid, reason)
                longest = grace
            else:
                self.break_(sid, reason)
        return longest

    def break_(self, sid: int, reason: str) -> None:
        session = self.open.pop(sid, None)
        if session is None:
            return
        self.broken[reason] += session[2]
        for server in session[0]:
            server.sessions.discard(sid)
