"""The status page's data (node/supervisor/timeline.py, node/supervisor/status_view.py), as pure logic:
the charts' samples from heartbeat stats, quantiles from latency histograms, the swarm drawn per model,
and the figures the probe's table shares with the page."""

from __future__ import annotations

import pytest

from node.supervisor.status_view import figures, swarm_models
from node.supervisor.timeline import SAMPLES, Timeline, quantile
from protocol.dht_records import ServerInfo, ServerState
from protocol.messages import (
    LATENCY_BUCKETS,
    AllocatorStats,
    FrontendStats,
    LatencyHistogram,
    ModelServers,
    RuntimeStats,
    SwarmMap,
)


def steps(*seconds) -> FrontendStats:
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    for s in seconds:
        buckets[next((i for i, b in enumerate(LATENCY_BUCKETS) if s <= b), len(LATENCY_BUCKETS))] += 1
    return FrontendStats(latency={"inference_step": LatencyHistogram(buckets, sum(seconds), len(seconds))})


def test_quantiles_interpolate_within_buckets_as_prometheus_does():
    one_bucket = [0] * (len(LATENCY_BUCKETS) + 1)
    one_bucket[4] = 10  # ten steps in (0.05, 0.1]
    assert quantile(one_bucket, 0.5) == pytest.approx(0.075)
    assert quantile(one_bucket, 0.99) == pytest.approx(0.0995)
    assert quantile([0] * len(one_bucket), 0.5) is None
    beyond = [0] * len(one_bucket)
    beyond[-1] = 3
    assert quantile(beyond, 0.5) == LATENCY_BUCKETS[-1]


def test_samples_follow_the_counters_and_survive_replaced_actors():
    timeline = Timeline()
    allocator = AllocatorStats(sessions=2, used_bytes=100, capacity_bytes=1000)
    first = timeline.sample(0.0, RuntimeStats(tokens=0, queue=1), 11, allocator, {"frontend.0": steps()})
    assert first.tokens_per_s == 0 and first.step_p50_ms is None and first.queue == 1 and first.sessions == 2
    second = timeline.sample(1.0, RuntimeStats(tokens=300), 11, allocator, {"frontend.0": steps(0.02, 0.02, 0.02)})
    assert second.tokens_per_s == 300.0
    assert 10.0 < second.step_p50_ms <= 25.0
    # the runtime replaced: its count starts again, no negative rate; a replaced frontend's histogram is new
    third = timeline.sample(2.0, RuntimeStats(tokens=50), 12, allocator, {"frontend.0": steps(2.0)})
    assert third.tokens_per_s == 0.0
    assert third.step_p99_ms > 1000  # the 2 s step counts, the earlier three are still in the window
    for t in range(3, 3 + SAMPLES):
        timeline.sample(float(t), RuntimeStats(tokens=50), 12, allocator, {})
    assert len(timeline.samples) == SAMPLES  # bounded
    late = timeline.samples[-1]
    assert late.step_p50_ms is None  # the window moved past every step
    carried = timeline.sample(10_000.0, None, 12, None, {})  # both replaced: no stats until they are ready
    assert (carried.sessions, carried.cache_capacity_bytes, carried.tokens_per_s) == (2, 1000, 0.0)
    timeline.mark(5.0, "runtime.0", "restarted")
    assert timeline.as_dict()["events"] == [{"t": 5.0, "actor": "runtime.0", "what": "restarted"}]


def test_the_swarm_is_drawn_per_model_with_gaps_and_this_node_marked():
    def info(state, start, end, **extra):
        return ServerInfo(state=state, throughput=1.5, start_block=start, end_block=end, version="2.3.0", **extra)

    ours = info(ServerState.ONLINE, 0, 2, using_relay=False)
    theirs = info(ServerState.JOINING, 1, 3, using_relay=True)
    blocks = {0: {"me": ours}, 1: {"me": ours, "them": theirs}, 2: {"them": theirs}, 3: {}}
    other = {0: {"x": info(ServerState.ONLINE, 0, 1)}}
    view = SwarmMap(1, {"llama": ModelServers(4, None, blocks), "bloom": ModelServers(1, "https://hf.co/b", other)})
    page = swarm_models((100.0, view), own_peer="me")
    llama = page["models"][0]
    assert llama["prefix"] == "llama" and llama["coverage"] == [1, 1, 0, 0]  # JOINING does not count; 3 is a gap
    servers = {s["peer_id"]: s for s in llama["servers"]}
    assert servers["me"]["this_node"] and (servers["me"]["start"], servers["me"]["end"]) == (0, 2)
    assert servers["them"]["state"] == "joining" and servers["them"]["relay"] is True
    assert page["models"][1]["repository"] == "https://hf.co/b"
    assert swarm_models(None, "me") == {"read_at": None, "error": "", "models": []}


def test_the_probe_and_the_page_show_the_same_figures():
    stats = {"queue": 3, "round_sizes": {"1": 4}, "busy_seconds": 1.5, "sessions": 2, "latency": {}}
    assert figures(stats) == {"busy_seconds": 1.5, "queue": 3, "sessions": 2}
