"""What a frontend counts for the node's metrics (node/supervisor/metrics.py): calls, errors and refusals
by RPC and reason, latency histograms per RPC and per inference step, sessions recovered."""

from __future__ import annotations

import bisect

from protocol.messages import LATENCY_BUCKETS, LatencyHistogram


class Counters:
    def __init__(self, log):
        self.log = log
        self.calls: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.recovered = 0  # sessions whose cache was rebuilt on a replaced runtime
        self.latency: dict[str, LatencyHistogram] = {}  # per RPC (and per inference step)

    def call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def error(self, name: str, error: BaseException) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1
        self.log.info("request failed", rpc=name, error=str(error))

    def observe(self, name: str, seconds: float) -> None:
        entry = self.latency.get(name)
        if entry is None:
            entry = self.latency[name] = LatencyHistogram([0] * (len(LATENCY_BUCKETS) + 1))
        entry.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        entry.sum += seconds
        entry.count += 1

    def refuse(self, reason: str, peer: str, detail: str) -> None:
        """Count a refusal by a limit (node_refused_total{reason}) and log it with the peer."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.log.info("refused", reason=reason, peer=peer, detail=detail)

    def recovery(self, seconds: float) -> None:
        self.recovered += 1
        self.observe("session_recovery", seconds)

    def latency_copy(self) -> dict[str, LatencyHistogram]:
        return {name: LatencyHistogram(list(h.buckets), h.sum, h.count) for name, h in self.latency.items()}
