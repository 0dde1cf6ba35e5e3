"""How a server places itself, step by step in simulated time: the node's rule and Petals' rule.

Both choose with node/supervisor/block_selection.py, the Petals rule itself (checked against Petals'
own functions in tests/unit/test_simulate.py). The node's steps are node/supervisor/placement_rules.py,
the functions its supervisor calls: a move needs `balance_checks` consecutive imbalanced checks (one
where a block has no server), the target must differ from its span, it loads the added blocks while
serving when they fit (then switches at once) and otherwise drains its sessions before restarting, and
it confirms the move before each step. Petals' server, as PROTOCOL 5.1 describes it: after a random
wait it chooses; at each check that finds the swarm unbalanced it shuts down (its sessions end), waits,
chooses again and reloads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from node.supervisor import block_selection, placement_rules
from protocol.dht_records import ServerState

if TYPE_CHECKING:
    from node.simulate.simulation import Simulation
    from node.simulate.swarm import Server

SWITCH_PAUSE = 1.5  # the node's wait after a switch for a node that switched at the same moment (moves.py)


class PetalsRule:
    name = "petals"

    def __init__(self, sim: "Simulation"):
        self.sim = sim
        self.config = sim.config

    def join(self, server: "Server") -> None:
        self.wait_then_choose(server)

    def wait_then_choose(self, server: "Server") -> None:
        delay = self.sim.rng.uniform(0, 2 * self.config.selection_delay_s)
        self.sim.events.at(delay, self.choose, server, server=server)

    def choose(self, server: "Server") -> None:
        view = self.sim.dht.view
        blocks = block_selection.best_blocks(server.count, view.spans, view.total, view.throughputs())
        self.load(server, blocks, server.count)

    def load(self, server: "Server", blocks, loaded: int) -> None:
        server.blocks = blocks
        self.sim.announce(server, ServerState.JOINING)
        self.sim.events.at(loaded * self.config.block_load_s, self.online, server, server=server)

    def online(self, server: "Server") -> None:
        self.sim.announce(server, ServerState.ONLINE)
        self.sim.serve(server, server.blocks)
        self.sim.landed(server)
        server.moving = False
        server.chain += 1
        self.next_check(server)

    def next_check(self, server: "Server") -> None:
        delay = self.sim.rng.uniform(0, 2 * self.config.check_period_s)
        self.sim.events.at(delay, self.check, server, server.chain, server=server)

    def check(self, server: "Server", chain: int) -> None:
        if chain != server.chain:
            return
        view = self.sim.dht.view
        if server.peer in view.spans and block_selection.should_move(
            server.peer, view.spans, view.total, self.config.balance_quality, self.sim.rule_rng, view.throughputs()
        ):
            self.sim.moved(server)
            self.sim.announce(server, ServerState.OFFLINE)
            self.sim.serve(server, None)
            self.sim.clients.interrupt(server, "move", grace=0.0)
            self.wait_then_choose(server)
            return
        self.next_check(server)

    def leave(self, server: "Server") -> float:
        """A graceful leave: OFFLINE, and the open sessions end. Returns how long it still serves."""
        self.sim.clients.interrupt(server, "leave", grace=0.0)
        return 0.0


class NodeRule(PetalsRule):
    name = "node"

    def join(self, server: "Server") -> None:
        if server.count >= self.config.total_blocks:
            self.load(server, (0, self.config.total_blocks), server.count)  # one place only: no wait
        else:
            self.wait_then_choose(server)

    def online(self, server: "Server") -> None:
        self.sim.announce(server, ServerState.ONLINE)
        self.sim.serve(server, server.blocks)
        self.sim.landed(server)
        server.moving = False
        if not server.checking and server.count < self.config.total_blocks:
            server.checking = True  # one loop of checks for the server's life, as the supervisor's
            self.next_check(server)

    def check(self, server: "Server", chain: int) -> None:
        self.next_check(server)
        if server.moving or server.state != ServerState.ONLINE:
            return
        view = self.sim.dht.view
        if not view.visible(server.peer):
            server.streak = 0
            return
        target = placement_rules.balance_target(
            server.peer, server.blocks, server.count, view, self.config.balance_quality, self.sim.rule_rng
        )
        server.streak, move = placement_rules.after_check(
            server.streak, target, self.config.balance_checks, view.has_hole()
        )
        if move is not None:
            server.moving = True
            old = server.blocks
            added = sum(1 for b in range(*move) if not old[0] <= b < old[1])
            if added * self.config.block_bytes <= server.free_bytes * (1 - self.config.memory_margin):
                self.sim.events.at(added * self.config.block_load_s, self.switch, server, old, move, server=server)
            else:
                self.drain_then_restart(server, old, move)

    # load-then-switch (moves.py: switch)
    def switch(self, server: "Server", old, target) -> None:
        view = self.sim.dht.view
        now = placement_rules.confirm_switch(server.peer, old, target, server.count, view)
        if now is None:
            server.moving = False
            return
        self.sim.moved(server)
        server.blocks = now
        self.sim.announce(server, ServerState.ONLINE, retire=old)
        self.sim.serve(server, now)
        self.sim.clients.interrupt(server, "move", grace=self.config.drain_s)  # they finish on the old blocks
        self.sim.events.at(SWITCH_PAUSE, self.after_switch, server, old, now, server=server)

    def after_switch(self, server: "Server", old, new) -> None:
        if placement_rules.switched_together(server.peer, old, new, server.count, self.sim.dht.view):
            server.blocks = old
            self.sim.announce(server, ServerState.ONLINE, retire=new)
            self.sim.serve(server, old)
        self.sim.landed(server)
        server.moving = False

    # drain-then-restart (moves.py: drain_and_restart)
    def drain_then_restart(self, server: "Server", old, target) -> None:
        self.sim.announce(server, ServerState.OFFLINE)
        self.sim.serve(server, None)
        longest = self.sim.clients.interrupt(server, "move", grace=self.config.drain_s)
        wait = max(SWITCH_PAUSE, min(self.config.drain_s, longest))
        self.sim.events.at(wait, self.after_drain, server, old, target, server=server)

    def after_drain(self, server: "Server", old, target) -> None:
        now = placement_rules.confirm_move(server.peer, old, target, server.count, self.sim.dht.view)
        if now is None:  # the old blocks are the best place now: ONLINE there again
            self.sim.announce(server, ServerState.ONLINE)
            self.sim.serve(server, old)
            server.moving = False
            return
        self.sim.moved(server)
        self.load(server, now, server.count)

    def leave(self, server: "Server") -> float:
        """A graceful stop: OFFLINE, and open sessions get --shutdown_grace to finish."""
        return self.sim.clients.interrupt(server, "leave", grace=self.config.drain_s)
