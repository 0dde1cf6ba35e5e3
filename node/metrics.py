"""Prometheus metrics of a node: `--metrics_port PORT` serves them at http://HOST:PORT/metrics.

Owned by the supervisor, which already receives every actor's stats in its heartbeats: nothing in
the serving path is touched to scrape. A collector reads the latest stats at each scrape. Counters
stay monotonic when an actor is replaced (its successor counts from zero): what a predecessor had
counted is kept as an offset.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # procs/rpc_handlers.py


class Monotonic:
    """Sums of per-actor counters that survive the actor's replacement."""

    def __init__(self):
        self.last: dict[tuple, float] = {}
        self.offset: dict[tuple, float] = {}

    def __call__(self, key: tuple, value: float) -> float:
        if value < self.last.get(key, 0.0):  # a new process counts from zero
            self.offset[key] = self.offset.get(key, 0.0) + self.last[key]
        self.last[key] = value
        return self.offset.get(key, 0.0) + value


class NodeCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot  # () -> {"state", "blocks", "actors": {name: {"restarts", "ready", "stats"}}}
        self.monotonic = Monotonic()

    def collect(self) -> Iterable:
        snap = self.snapshot()
        actors = snap["actors"]
        yield _gauge("node_state", "0 offline, 1 joining, 2 online; -1 before the first announcement", snap["state"])
        start, end = snap["blocks"]
        blocks = GaugeMetricFamily("node_blocks", "blocks served", labels=["start", "end"])
        blocks.add_metric([str(start), str(end)], end - start)
        yield blocks
        yield _gauge("node_moves", "rebalancing moves made", snap.get("moves", 0))

        up = GaugeMetricFamily("node_actor_up", "actor ready (1) or not (0)", labels=["actor"])
        restarts = CounterMetricFamily("node_actor_restarts", "times the supervisor replaced the actor", labels=["actor"])
        for name, actor in actors.items():
            up.add_metric([name], 1 if actor["ready"] else 0)
            restarts.add_metric([name], actor["restarts"])
        yield up
        yield restarts

        requests = CounterMetricFamily("node_requests", "requests per RPC", labels=["rpc"])
        errors = CounterMetricFamily("node_request_errors", "requests answered with an error, per RPC", labels=["rpc"])
        latency = HistogramMetricFamily("node_request_seconds", "time to answer, per RPC, and per inference step", labels=["rpc"])
        calls, failed, histograms = {}, {}, {}
        in_flight = 0
        for name, actor in actors.items():
            if not name.startswith("frontend"):
                continue
            stats = actor["stats"]
            in_flight += stats.get("in_flight", 0)
            for rpc, n in stats.get("calls", {}).items():
                calls[rpc] = calls.get(rpc, 0) + self.monotonic((name, "calls", rpc), n)
            for rpc, n in stats.get("errors", {}).items():
                failed[rpc] = failed.get(rpc, 0) + self.monotonic((name, "errors", rpc), n)
            for rpc, entry in stats.get("latency", {}).items():
                h = histograms.setdefault(rpc, {"buckets": [0.0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0})
                for i, n in enumerate(entry["buckets"]):
                    h["buckets"][i] += self.monotonic((name, "latency", rpc, i), n)
                h["sum"] += self.monotonic((name, "latency_sum", rpc), entry["sum"])
        for rpc, n in sorted(calls.items()):
            requests.add_metric([rpc], n)
        for rpc, n in sorted(failed.items()):
            errors.add_metric([rpc], n)
        for rpc, h in sorted(histograms.items()):
            cumulative, buckets = 0.0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), h["buckets"]):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            latency.add_metric([rpc], buckets, h["sum"])
        yield requests
        yield errors
        yield latency
        yield _gauge("node_requests_in_flight", "requests being handled by the frontends", in_flight)
        yield _gauge("node_sessions_open", "inference sessions open", sum(
            a["stats"].get("sessions", 0) for n, a in actors.items() if n.startswith("frontend")))

        runtime = actors.get("runtime.0", {}).get("stats", {})
        yield _gauge("node_queue_depth", "tasks waiting in the runtime", runtime.get("queue", 0))
        yield _gauge("node_steps_in_progress", "inference steps under way (chunked prefills)", runtime.get("in_progress", 0))
        yield _counter("node_runtime_rounds", "compute rounds run by the runtime", self.monotonic(("runtime", "rounds"), runtime.get("rounds", 0)))
        yield _counter("node_runtime_busy_seconds", "time the runtime spent computing",
                       self.monotonic(("runtime", "busy"), runtime.get("busy_seconds", 0.0)))
        sizes = CounterMetricFamily("node_batch_size_rounds", "rounds by how many requests ran together", labels=["requests"])
        for size, n in sorted(runtime.get("round_sizes", {}).items(), key=lambda kv: int(kv[0])):
            sizes.add_metric([size], self.monotonic(("runtime", "round_size", size), n))
        yield sizes

        allocator = actors.get("allocator", {}).get("stats", {})
        used, capacity = allocator.get("used_bytes", 0), allocator.get("capacity_bytes", 0)
        yield _gauge("node_cache_bytes_used", "attention cache bytes held by sessions", used)
        yield _gauge("node_cache_bytes_left", "attention cache bytes free", max(0, capacity - used))
        yield _gauge("node_cache_waiting", "allocations queued for cache", allocator.get("waiting", 0))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def serve(port: int, snapshot: Callable[[], dict], addr: str = "0.0.0.0"):
    """Start the HTTP endpoint on a thread; returns (server, thread) for shutdown."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(snapshot))
    return start_http_server(port, addr=addr, registry=registry)
