"""What a simulation is of: the model, the servers, the churn, the timings and the clients, with
defaults a user can change from the command line (`python -m node.simulate --help`).

The defaults sketch a public swarm serving a Llama-2-70B-shaped model in NF4: 80 blocks of about
0.47 GB, 4 KiB of attention cache per token and block, and a thousand volunteers on mixed hardware,
each staying about eight hours. The figures per device are guesses of the right order, not
measurements; what the simulation compares is the rules, on the same swarm.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

from node.supervisor import resources

GB = 1e9


@dataclass(frozen=True)
class Device:
    """One kind of server: how much memory its blocks share, how fast it computes one block."""

    name: str
    memory_gb: float
    kind: str  # "cuda" (the whole device counts) or "cpu" (the RAM available, less the margin)
    forward_rps: float  # tokens per second through one block (PROTOCOL 5.2)
    share: float  # of the servers

    @classmethod
    def parse(cls, text: str) -> "Device":
        parts = text.split(":")
        if len(parts) != 5:
            raise ValueError(f"a device is NAME:MEMORY_GB:cuda|cpu:FORWARD_RPS:SHARE, not {text!r}")
        name, memory, kind, rps, share = parts
        if kind not in ("cuda", "cpu"):
            raise ValueError(f"device {name}: the kind must be cuda or cpu, not {kind!r}")
        device = cls(name, float(memory), kind, float(rps), float(share))
        if not (device.memory_gb > 0 and device.forward_rps > 0 and device.share >= 0):
            raise ValueError(f"device {name}: memory and forward_rps must be positive, the share not negative")
        return device


DEVICES = (
    Device("A100-80GB", 80, "cuda", 4000, 0.05),
    Device("RTX4090-24GB", 24, "cuda", 2500, 0.15),
    Device("RTX3090-24GB", 24, "cuda", 1500, 0.30),
    Device("T4-16GB", 16, "cuda", 400, 0.30),
    Device("CPU-64GB", 64, "cpu", 20, 0.20),
)


@dataclass(frozen=True)
class Config:
    # what the swarm serves
    total_blocks: int = 80
    hidden_size: int = 8192
    block_bytes: float = 0.47 * GB
    cache_bytes_per_token: float = 4096  # one token of K and V for one block
    cache_tokens: int = 16384
    # who serves it
    servers: int = 1000  # the population the churn keeps on average
    devices: tuple = DEVICES
    network_mbps: tuple = (50.0, 1000.0)  # drawn log-uniformly between these
    relay_share: float = 0.3  # reachable only through relays: a fifth of the network term
    node_share: float = 0.5  # of the servers running the node, in the mixed rule
    # churn
    mean_lifetime_h: float = 8.0
    lifetime: str = "exponential"  # or lognormal (sigma 1) or weibull (shape 0.7, a heavy tail)
    crash_share: float = 0.3  # leaves without a word: the record lingers until it expires
    ramp_min: float = 30.0  # the first population arrives over this
    # timings (seconds)
    block_load_s: float = 10.0
    selection_delay_s: float = 5.0  # mean of the random wait before choosing
    check_period_s: float = 60.0  # mean of the random wait between balance checks
    update_period_s: float = 120.0  # DHT refresh
    expiration_s: Optional[float] = None  # None: max(2 x update period, 3), as Petals
    dead_after_s: Optional[float] = None  # a what-if: readers drop a crashed server's record this soon
    drain_s: float = 300.0  # the node's --drain_timeout (its --shutdown_grace)
    balance_quality: float = 0.75
    balance_checks: int = 3
    memory_margin: float = 0.2
    # clients
    sessions_per_hour: float = 2000.0
    session_min: float = 5.0  # mean length, exponential
    # the run
    hours: float = 24.0
    warmup_h: float = 1.0  # left out of the figures: the first population still arriving
    sample_s: float = 30.0
    seeds: int = 3
    rules: tuple = ("node", "petals", "mixed")
    jobs: int = 2
    out: str = os.path.join(tempfile.gettempdir(), "node-simulate")  # where the report and charts go
    name: str = "default"

    @property
    def expiration(self) -> float:
        return self.expiration_s if self.expiration_s is not None else max(2 * self.update_period_s, 3.0)

    def check(self) -> "Config":
        """A clear error naming the input that cannot be simulated."""
        positive = (
            "total_blocks hidden_size block_bytes cache_tokens servers mean_lifetime_h block_load_s "
            "selection_delay_s check_period_s update_period_s hours sample_s seeds jobs session_min"
        )
        for name in positive.split():
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, not {getattr(self, name)}")
        for name in ("relay_share", "crash_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name} is a share between 0 and 1, not {getattr(self, name)}")
        if not 0 <= self.node_share <= 1:
            raise ValueError(f"--node_share is a share between 0 and 1, not {self.node_share}")
        if self.lifetime not in LIFETIMES:
            raise ValueError(f"--lifetime must be one of {', '.join(LIFETIMES)}, not {self.lifetime!r}")
        if not self.devices or sum(d.share for d in self.devices) <= 0:
            raise ValueError("--device: at least one device with a positive share")
        low, high = self.network_mbps
        if not 0 < low <= high:
            raise ValueError(f"--network_mbps LOW HIGH with 0 < LOW <= HIGH, not {low} {high}")
        if self.expiration < self.update_period_s:
            raise ValueError("--expiration_s shorter than --update_period_s: live servers' records would lapse")
        if self.dead_after_s is not None and self.dead_after_s < 0:
            raise ValueError("--dead_after_s must not be negative")
        if self.warmup_h >= self.hours:
            raise ValueError(f"--warmup_h ({self.warmup_h}) must be shorter than --hours ({self.hours})")
        if self.balance_checks < 1:
            raise ValueError("--balance_checks must be at least 1")
        for rule in self.rules:
            if rule not in RULES:
                raise ValueError(f"--rules: {rule!r} is not one of {', '.join(RULES)}")
        if self.sessions_per_hour < 0:
            raise ValueError("--sessions_per_hour must not be negative")
        for device in self.devices:
            try:
                blocks_and_room(self, device)
            except resources.NotEnoughMemory as e:
                raise ValueError(f"--device {device.name}: {e}") from None
        return self


LIFETIMES = ("exponential", "lognormal", "weibull")
RULES = ("node", "petals", "mixed")

QUICK = dict(servers=100, total_blocks=40, hours=2.0, warmup_h=0.5, seeds=2, sessions_per_hour=300.0, name="quick")
HEAVY = dict(mean_lifetime_h=1.0, crash_share=0.6, lifetime="weibull", name="heavy churn")


HELP = {
    "total_blocks": "blocks of the model",
    "hidden_size": "the model's hidden size (network throughput per token)",
    "block_bytes": "one block's weights as served",
    "cache_bytes_per_token": "attention cache of one token in one block",
    "cache_tokens": "attention cache each server keeps per block (--attn_cache_tokens)",
    "servers": "servers on average: the churn keeps the population there",
    "relay_share": "share of servers reachable only through relays",
    "node_share": "share of servers running the node in the mixed rule",
    "mean_lifetime_h": "mean stay of a server, hours",
    "lifetime": "distribution of stays: exponential, lognormal or weibull",
    "crash_share": "share of servers that crash (their records linger) rather than leave",
    "ramp_min": "the first population arrives over these minutes",
    "block_load_s": "seconds to load one block",
    "selection_delay_s": "mean random wait before choosing blocks (--mean_block_selection_delay)",
    "check_period_s": "mean random wait between balance checks (--mean_balance_check_period)",
    "update_period_s": "DHT refresh period (--update_period)",
    "expiration_s": "DHT record lifetime (default: twice the update period)",
    "dead_after_s": "what-if: a crashed server's record vanishes this soon (default: at expiry)",
    "drain_s": "the node's --drain_timeout: open sessions finish within it when it moves or stops",
    "balance_quality": "--balance_quality",
    "balance_checks": "the node's --balance_checks",
    "memory_margin": "the node's --memory_margin (room to load before switching)",
    "sessions_per_hour": "client sessions arriving per hour (0: none)",
    "session_min": "mean session length, minutes",
    "hours": "simulated hours",
    "warmup_h": "first hours left out of the figures",
    "sample_s": "seconds between samples of the swarm's throughput",
    "seeds": "runs per rule, seeds 0..N-1",
    "jobs": "processes running them",
    "out": "folder for report.md, throughput.png, throughput.txt, series.json",
    "name": "the setting's name in the report",
}


def parse(argv: Optional[Sequence[str]] = None) -> Config:
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="python -m node.simulate",
        description="A swarm of virtual servers over simulated hours: the node's placement against Petals' rule.",
    )
    p.add_argument("--quick", action="store_true", help="a small swarm for a few hours (for tests)")
    p.add_argument("--heavy_churn", action="store_true", help="servers stay an hour on average, most crash")
    p.add_argument(
        "--device",
        action="append",
        type=_device,
        help="NAME:MEMORY_GB:cuda|cpu:FORWARD_RPS:SHARE, repeated for a mix (default: "
        + ", ".join(f"{d.name}:{d.memory_gb:g}:{d.kind}:{d.forward_rps:g}:{d.share:g}" for d in DEVICES)
        + ")",
    )
    p.add_argument(
        "--network_mbps", nargs=2, type=float, metavar=("LOW", "HIGH"), help="drawn log-uniformly (default 50 1000)"
    )
    p.add_argument("--rules", nargs="+", choices=RULES, help="the rules to run (default: all three)")
    for f in fields(Config):
        if f.name in ("devices", "network_mbps", "rules"):
            continue
        value = getattr(defaults, f.name)
        kind = {int: int, float: float, str: str}.get(type(value), float)
        p.add_argument(f"--{f.name}", type=kind, help=f"{HELP.get(f.name, '')} (default {value})".strip())
    args = p.parse_args(argv)
    chosen = {k: v for k, v in vars(args).items() if v is not None and k in {f.name for f in fields(Config)}}
    if args.device:
        chosen["devices"] = tuple(args.device)
    if args.network_mbps:
        chosen["network_mbps"] = tuple(args.network_mbps)
    if args.rules:
        chosen["rules"] = tuple(args.rules)
    preset = {**(QUICK if args.quick else {}), **(HEAVY if args.heavy_churn else {})}
    if args.quick and args.heavy_churn:
        preset["name"] = "quick, heavy churn"
    try:
        return replace(defaults, **{**preset, **chosen}).check()
    except ValueError as e:
        p.error(str(e))


def _device(text: str) -> Device:
    try:
        return Device.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def blocks_and_room(config: Config, device) -> tuple[int, float]:
    """The node's own estimate of how many blocks fit (resources.py), and the memory left beside them."""
    memory = int(device.memory_gb * 1e9)
    estimate = resources.estimate_num_blocks(
        device_type=device.kind,
        device_memory=memory,
        available_memory=memory,
        block_bytes=int(config.block_bytes),
        cache_bytes=int(config.cache_bytes_per_token * config.cache_tokens),
        hidden_size=config.hidden_size,
        total_blocks=config.total_blocks,
        margin=config.memory_margin,
    )
    return estimate.num_blocks, estimate.memory - estimate.num_blocks * config.block_bytes


def lifetime_draw(config: Config, rng) -> float:
    """A server's stay in seconds, with the configured mean."""
    mean = config.mean_lifetime_h * 3600
    if config.lifetime == "lognormal":
        sigma = 1.0
        return rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)
    if config.lifetime == "weibull":
        shape = 0.7
        return rng.weibullvariate(mean / math.gamma(1 + 1 / shape), shape)
    return rng.expovariate(1 / mean)
