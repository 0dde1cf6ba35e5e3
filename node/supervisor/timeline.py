"""The last minutes of the node, for the status page's charts: one sample a second, kept in memory.

Owned by the supervisor, which calls `sample` once a second with its actors' latest heartbeat stats and
`mark` when an actor is replaced. Pure bookkeeping with the clock passed in; bounded (SAMPLES samples,
EVENTS events), so it costs the same after a month as after a minute.

A sample: tokens per second the runtime computed (from its cumulative count), inference step latency
(median and 99th percentile over the last WINDOW seconds, from the frontends' histograms), the runtime's
queue, the sessions open and the attention cache used.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

from protocol.messages import LATENCY_BUCKETS, AllocatorStats, FrontendStats, RuntimeStats

SAMPLES = 600  # ten minutes at one a second
EVENTS = 100
WINDOW = 10  # seconds of steps behind each latency figure
STEP = "inference_step"


@dataclass
class Sample:
    t: float  # unix time
    tokens_per_s: float
    step_p50_ms: Optional[float]  # None: no step in the window
    step_p99_ms: Optional[float]
    queue: int
    sessions: int
    cache_used_bytes: int
    cache_capacity_bytes: int


@dataclass
class Event:
    t: float
    actor: str
    what: str  # "restarted", "restarted with its group"


def quantile(buckets: list[float], q: float) -> Optional[float]:
    """The q-quantile of a histogram over LATENCY_BUCKETS (one more bucket for +Inf), interpolated within
    its bucket as Prometheus' histogram_quantile does; None when it holds nothing."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank, seen = q * total, 0.0
    for i, count in enumerate(buckets):
        if count > 0 and seen + count >= rank:
            upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if 0 < i <= len(LATENCY_BUCKETS) else 0.0
            if i == len(LATENCY_BUCKETS):
                return upper  # beyond the last bound: report the bound, as Prometheus does
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


class Timeline:
    def __init__(self):
        self.samples: deque[Sample] = deque(maxlen=SAMPLES)
        self.events: deque[Event] = deque(maxlen=EVENTS)
        self._last: Optional[tuple[float, int, int]] = None  # (t, runtime pid, its cumulative tokens)
        self._steps: dict[str, list[int]] = {}  # frontend -> its cumulative step histogram, last seen
        self._window: deque[tuple[float, list[int]]] = deque()  # (t, steps histogram delta of that second)

    def mark(self, t: float, actor: str, what: str) -> None:
        self.events.append(Event(t, actor, what))

    def sample(
        self,
        t: float,
        runtime: Optional[RuntimeStats],
        runtime_pid: Optional[int],
        allocator: Optional[AllocatorStats],
        frontends: dict[str, FrontendStats],
    ) -> Sample:
        """A replaced actor has no stats until its first heartbeat: its gauges keep their last values
        rather than drop to zero for a second."""
        last = self.samples[-1] if self.samples else None
        if runtime is None:
            runtime = RuntimeStats(tokens=self._last[2] if self._last else 0, queue=last.queue if last else 0)
            runtime_pid = self._last[1] if self._last else runtime_pid
        if allocator is None:
            allocator = AllocatorStats(
                sessions=last.sessions if last else 0,
                used_bytes=last.cache_used_bytes if last else 0,
                capacity_bytes=last.cache_capacity_bytes if last else 0,
            )
        tokens_per_s = 0.0
        if self._last is not None and self._last[1] == runtime_pid and t > self._last[0]:
            tokens_per_s = max(0, runtime.tokens - self._last[2]) / (t - self._last[0])
        self._last = (t, runtime_pid, runtime.tokens)
        self._window.append((t, self._step_delta(frontends)))
        while self._window and self._window[0][0] <= t - WINDOW:
            self._window.popleft()
        merged = [sum(col) for col in zip(*(delta for _, delta in self._window))]
        p50, p99 = quantile(merged, 0.5), quantile(merged, 0.99)
        sample = Sample(
            t=t,
            tokens_per_s=round(tokens_per_s, 2),
            step_p50_ms=None if p50 is None else round(1000 * p50, 2),
            step_p99_ms=None if p99 is None else round(1000 * p99, 2),
            queue=runtime.queue,
            sessions=allocator.sessions,
            cache_used_bytes=allocator.used_bytes,
            cache_capacity_bytes=allocator.capacity_bytes,
        )
        self.samples.append(sample)
        return sample

    def _step_delta(self, frontends: dict[str, FrontendStats]) -> list[int]:
        """Steps answered since the last sample, per latency bucket, over every frontend (a replaced
        frontend counts from zero: its first histogram is all new)."""
        delta = [0] * (len(LATENCY_BUCKETS) + 1)
        for name, stats in frontends.items():
            histogram = stats.latency.get(STEP)
            now = list(histogram.buckets) if histogram is not None else [0] * len(delta)
            before = self._steps.get(name)
            if before is None or any(n < b for n, b in zip(now, before)):
                before = [0] * len(now)
            for i, (n, b) in enumerate(zip(now, before)):
                if i < len(delta):
                    delta[i] += n - b
            self._steps[name] = now
        for name in [n for n in self._steps if n not in frontends]:
            del self._steps[name]
        return delta

    def as_dict(self) -> dict:
        return {"samples": [asdict(s) for s in self.samples], "events": [asdict(e) for e in self.events]}
