"""Prometheus metrics of a node: `--metrics_port PORT` serves them at http://HOST:PORT/metrics.

Owned by the supervisor, which already receives every actor's stats in its heartbeats: nothing in
the serving path is touched to scrape. Receives: every heartbeat (Totals.observe, for counters) and,
at each scrape, a snapshot of the supervisor's table (state, blocks, restarts, latest stats, for
gauges). Sends: the Prometheus text format over HTTP from prometheus_client's server thread.
Counters stay monotonic when an actor is replaced (its successor counts from zero): what each
predecessor had counted is kept.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from protocol.messages import LATENCY_BUCKETS, ActorStats, AllocatorStats, FrontendStats, KeeperStats, RuntimeStats

RECOVERY = "session_recovery"  # the frontends' latency key for node_session_recovery_seconds


class Totals:
    """Counters summed over every process that has held each actor's name.

    Fed by the supervisor with every heartbeat, keyed by the process that counted (Heartbeat.pid): when
    a new process takes over an actor's name it counts from zero, and what its predecessor had counted,
    up to its last heartbeat, is kept. Seeing every heartbeat, not only those a scrape happens to
    read, is what keeps this exact whenever the scrapes come. Read by the collector on the HTTP thread.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.pids: dict[str, int] = {}
        self.current: dict[str, dict[tuple, float]] = {}  # actor -> what its running process counted
        self.past: dict[tuple, float] = {}  # what processes that are gone counted, summed over them

    def observe(self, actor: str, pid: int, stats: Optional[ActorStats]) -> None:
        try:
            counts = dict(counters(stats))
        except (TypeError, ValueError, AttributeError):
            return  # stats of an unexpected shape must not take the supervisor's receive loop down
        with self.lock:
            if pid != self.pids.get(actor):
                for key, value in self.current.pop(actor, {}).items():
                    self.past[key] = self.past.get(key, 0.0) + value
                self.pids[actor] = pid
            mine = self.current.setdefault(actor, {})
            for key, value in counts.items():
                mine[key] = max(mine.get(key, 0.0), value)  # never backwards, even for a rounded float

    def totals(self) -> dict[tuple, float]:
        with self.lock:
            out = dict(self.past)
            for counts in self.current.values():
                for key, value in counts.items():
                    out[key] = out.get(key, 0.0) + value
        return out


def counters(stats: Optional[ActorStats]) -> Iterator[tuple[tuple, float]]:
    """The monotonic counts in one actor's heartbeat stats, as ((metric, *labels), value)."""
    if isinstance(stats, (FrontendStats, AllocatorStats, RuntimeStats, KeeperStats)):
        for reason, n in stats.refused.items():
            yield ("refused", reason), float(n)
    if isinstance(stats, FrontendStats):
        yield ("recovered",), float(stats.recovered)
        for rpc, n in stats.calls.items():
            yield ("requests", rpc), float(n)
        for rpc, n in stats.errors.items():
            yield ("errors", rpc), float(n)
        for rpc, histogram in stats.latency.items():
            for i, n in enumerate(histogram.buckets):
                yield ("latency_bucket", rpc, i), float(n)
            yield ("latency_sum", rpc), float(histogram.sum)
    elif isinstance(stats, KeeperStats):
        yield ("handed_over",), float(stats.resumed)
        yield ("calls_resent",), float(stats.calls_resent)
        yield ("steps_timed",), float(stats.steps_timed)
        yield ("step_seconds",), float(stats.step_seconds)
        yield ("step_compute_seconds",), float(stats.step_compute_seconds)
    elif isinstance(stats, RuntimeStats):  # runtime.0 runs every round (procs/runtime.py)
        yield ("rounds",), float(stats.rounds)
        yield ("busy_seconds",), float(stats.busy_seconds)
        yield ("tasks", "done"), float(stats.done)
        yield ("tasks", "failed"), float(stats.failed)
        for size, n in stats.round_sizes.items():
            yield ("round_size", str(size)), float(n)


class NodeCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict], totals: Totals):
        self.snapshot = snapshot  # () -> {"state", "blocks", "moves", "actors": {name: {"restarts", "ready", "stats"}}}
        self.totals = totals

    def collect(self) -> Iterable:
        snap = self.snapshot()
        actors = snap["actors"]
        totals = self.totals.totals()
        yield _gauge("node_state", "0 offline, 1 joining, 2 online; -1 before the first announcement", snap["state"])
        start, end = snap["blocks"]
        blocks = GaugeMetricFamily("node_blocks", "blocks served", labels=["start", "end"])
        blocks.add_metric([str(start), str(end)], end - start)
        yield blocks
        yield _gauge("node_moves", "rebalancing moves made", snap.get("moves", 0))
        yield _counter("node_reloads", "rolling reloads completed (SIGHUP)", snap.get("reloads", 0))

        up = GaugeMetricFamily("node_actor_up", "actor ready (1) or not (0)", labels=["actor"])
        restarts = CounterMetricFamily(
            "node_actor_restarts", "times the supervisor replaced the actor", labels=["actor"]
        )
        for name, actor in actors.items():
            up.add_metric([name], 1 if actor["ready"] else 0)
            restarts.add_metric([name], actor["restarts"])
        yield up
        yield restarts

        requests = CounterMetricFamily("node_requests", "requests per RPC", labels=["rpc"])
        errors = CounterMetricFamily("node_request_errors", "requests answered with an error, per RPC", labels=["rpc"])
        latency = HistogramMetricFamily(
            "node_request_seconds", "time to answer, per RPC, and per inference step", labels=["rpc"]
        )
        for rpc, n in _labelled(totals, "requests"):
            requests.add_metric([rpc], n)
        for rpc, n in _labelled(totals, "errors"):
            errors.add_metric([rpc], n)
        recovery = HistogramMetricFamily(
            "node_session_recovery_seconds",
            "time from a session's step meeting a replaced runtime to its cache rebuilt and the step answered",
        )
        for rpc, total in _labelled(totals, "latency_sum"):
            if rpc == RECOVERY:
                recovery.add_metric([], _buckets(totals, rpc), total)
            else:
                latency.add_metric([rpc], _buckets(totals, rpc), total)
        refused = CounterMetricFamily(
            "node_refused",
            "requests refused by a limit on what peers may make the node hold, by reason",
            labels=["reason"],
        )
        for reason, n in _labelled(totals, "refused"):
            refused.add_metric([reason], n)
        yield requests
        yield errors
        yield refused
        yield latency
        yield _counter(
            "node_sessions_recovered",
            "inference sessions whose cache was rebuilt on a replaced runtime",
            totals.get(("recovered",), 0.0),
        )
        yield recovery
        frontends = [a["stats"] for a in actors.values() if isinstance(a["stats"], FrontendStats)]
        yield _gauge(
            "node_requests_in_flight", "requests being handled by the frontends", sum(s.in_flight for s in frontends)
        )
        yield _gauge("node_sessions_open", "inference sessions open", sum(s.sessions for s in frontends))
        yield _gauge(
            "node_history_bytes",
            "host memory holding what open sessions sent, to rebuild their caches on a replaced runtime",
            sum(s.history_bytes for s in frontends),
        )

        keeper = _stats(actors, "keeper", KeeperStats)
        yield _gauge("node_streams_kept", "inference streams a frontend's crash would not end", keeper.kept)
        yield _gauge(
            "node_stream_log_bytes", "what those streams' clients sent, held by the stream keeper", keeper.log_bytes
        )
        yield _counter(
            "node_streams_handed_over",
            "inference streams handed to another frontend after theirs died",
            totals.get(("handed_over",), 0.0),
        )
        yield _gauge(
            "node_calls_held",
            "calls (unary, or forward and backward streams read whole) the stream keeper holds, unanswered",
            keeper.calls,
        )
        yield _counter(
            "node_calls_resent",
            "calls sent again to another frontend after theirs died or retired",
            totals.get(("calls_resent",), 0.0),
        )
        yield _counter(
            "node_steps_timed",
            "inference steps timed from their client message read to their reply written",
            totals.get(("steps_timed",), 0.0),
        )
        yield _counter(
            "node_step_seconds",
            "those steps' time in the node, read to reply written",
            totals.get(("step_seconds",), 0.0),
        )
        yield _counter(
            "node_step_compute_seconds",
            "the blocks' compute in those steps: node_step_seconds less this is the node's fixed cost",
            totals.get(("step_compute_seconds",), 0.0),
        )

        runtime = _stats(actors, "runtime.0", RuntimeStats)
        yield _gauge("node_queue_depth", "tasks waiting in the runtime", runtime.queue)
        yield _gauge("node_steps_in_progress", "inference steps under way (chunked prefills)", runtime.in_progress)
        yield _counter("node_runtime_rounds", "compute rounds run by the runtime", totals.get(("rounds",), 0.0))
        yield _counter(
            "node_runtime_busy_seconds", "time the runtime spent computing", totals.get(("busy_seconds",), 0.0)
        )
        tasks = CounterMetricFamily(
            "node_runtime_tasks", "work items the runtime answered, by outcome", labels=["outcome"]
        )
        for outcome in ("done", "failed"):
            tasks.add_metric([outcome], totals.get(("tasks", outcome), 0.0))
        yield tasks
        sizes = CounterMetricFamily(
            "node_batch_size_rounds", "rounds by how many requests ran together", labels=["requests"]
        )
        for size, n in sorted(_labelled(totals, "round_size"), key=lambda kv: int(kv[0])):
            sizes.add_metric([size], n)
        yield sizes

        allocator = _stats(actors, "allocator", AllocatorStats)
        yield _gauge("node_cache_bytes_used", "attention cache bytes held by sessions", allocator.used_bytes)
        yield _gauge(
            "node_cache_bytes_left",
            "attention cache bytes free",
            max(0, allocator.capacity_bytes - allocator.used_bytes),
        )
        yield _gauge(
            "node_cache_tokens_used",
            "attention cache held by sessions, in tokens (Petals' cache_tokens_left unit)",
            allocator.tokens_used,
        )
        yield _gauge(
            "node_cache_tokens_left",
            "attention cache free, in tokens, as announced in cache_tokens_left",
            allocator.tokens_left,
        )
        yield _gauge("node_cache_waiting", "allocations queued for cache", allocator.waiting)
        yield _gauge(
            "node_history_bytes_reserved", "history memory reserved for open sessions", allocator.history_bytes
        )
        yield _gauge("node_history_bytes_capacity", "history memory (--history_bytes)", allocator.history_capacity)
        yield _gauge(
            "node_sessions_without_history",
            "sessions granted without history room, or whose deep prompts did not fit in it (they cannot survive "
            "a runtime restart), since the allocator started",
            allocator.sessions_without_history,
        )


def _buckets(totals: dict[tuple, float], rpc: str) -> list[tuple[str, float]]:
    cumulative, buckets = 0.0, []
    for i, bound in enumerate((*LATENCY_BUCKETS, float("inf"))):
        cumulative += totals.get(("latency_bucket", rpc, i), 0.0)
        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
    return buckets


def _stats(actors: dict, name: str, kind: type):
    """An actor's latest stats, or zeros before its first heartbeat."""
    stats = actors.get(name, {}).get("stats")
    return stats if isinstance(stats, kind) else kind()


def _labelled(totals: dict[tuple, float], metric: str) -> list[tuple[str, float]]:
    """(label, value) of a one-label counter, in label order."""
    return sorted((key[1], value) for key, value in totals.items() if key[0] == metric and len(key) == 2)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def registry(snapshot: Callable[[], dict], totals: Totals) -> CollectorRegistry:
    """The node's metrics, served at /metrics by node/supervisor/status_server.py."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(snapshot, totals))
    return reg
