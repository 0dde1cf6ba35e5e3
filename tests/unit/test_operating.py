"""What operators run the node with, checked without a node: the systemd unit file, the notify protocol
spoken to a socket the test binds itself, and the metrics' counters across actor replacements."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys

import pytest

from node.supervisor.sd_notify import Notifier
from tests.helpers.paths import ROOT


def test_systemd_unit_is_valid(tmp_path):
    """The unit parses without a complaint from systemd-analyze (where installed) and asks for what the
    node implements."""
    text = (ROOT / "node" / "supervisor" / "units" / "petals-node.service").read_text()
    unit = configparser.RawConfigParser(strict=False)
    unit.read_string(text.replace("\\\n", " "))
    service = unit["Service"]
    assert (
        service["Type"] == "notify"
        and service["NotifyAccess"] == "main"
        and service["KillMode"] in ("mixed", "control-group")
    )
    from node.supervisor.config import NodeConfig

    grace = NodeConfig(model="m").shutdown_grace
    assert int(service["WatchdogSec"]) > 0 and int(service["TimeoutStopSec"]) > grace + 5  # the drain, then stopping
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # a rolling reload (node/supervisor/reload.py)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    path = tmp_path / "petals-node.service"
    path.write_text(text.replace("/opt/petals-node/.venv/bin/python", sys.executable))
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if str(path) in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_notifier_speaks_the_systemd_protocol(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify"))
    server.settimeout(2)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_interval == 1.0
    assert notifier.ready("ONLINE")
    assert server.recv(4096).decode().split("\n")[:2] == ["READY=1", "STATUS=ONLINE"]
    assert notifier.watchdog(True, now=10.0) and server.recv(4096) == b"WATCHDOG=1"
    assert not notifier.watchdog(True, now=10.5)  # not due yet
    assert not notifier.watchdog(False, now=20.0)  # unhealthy: no ping, systemd's watchdog fires
    assert notifier.reloading()
    reloading = server.recv(4096).decode().split("\n")
    assert reloading[:2] == ["RELOADING=1", "STATUS=reloading"] and reloading[2].startswith("MONOTONIC_USEC=")
    assert notifier.stopping() and server.recv(4096).startswith(b"STOPPING=1")
    assert not Notifier({}).ready("ONLINE")  # outside systemd: nothing, no error
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"node-test-{os.getpid()}"
    abstract.bind("\0" + name)
    abstract.settimeout(2)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("x") and abstract.recv(100) == b"STATUS=x"


def test_metrics_totals_survive_an_actor_replacement():
    from node.frontend import counters
    from node.supervisor.metrics import LATENCY_BUCKETS, Totals
    from protocol.messages import FrontendStats, RuntimeStats

    assert LATENCY_BUCKETS == counters.LATENCY_BUCKETS  # one tuple, in protocol/messages.py
    totals = Totals()
    totals.observe("frontend.0", 100, FrontendStats(calls={"rpc_forward": 5}))
    totals.observe("frontend.0", 100, FrontendStats(calls={"rpc_forward": 7}))
    totals.observe("frontend.1", 101, FrontendStats(calls={"rpc_forward": 1}))
    assert totals.totals()[("requests", "rpc_forward")] == 8
    # the replacement has already counted more than its predecessor when it is first heard from
    totals.observe("frontend.0", 200, FrontendStats(calls={"rpc_forward": 9}))
    assert totals.totals()[("requests", "rpc_forward")] == 7 + 9 + 1
    totals.observe("frontend.0", 200, FrontendStats(calls={"rpc_forward": "bad"}))  # ignored, not raised
    totals.observe("runtime.0", 300, RuntimeStats(rounds=3, round_sizes={"2": 3}))
    totals.observe("runtime.0", 301, RuntimeStats(rounds=1, round_sizes={"1": 1}))
    t = totals.totals()
    assert t[("rounds",)] == 4 and t[("round_size", "2")] == 3 and t[("round_size", "1")] == 1


def test_refusals_are_exported_by_reason_across_actors():
    """node_refused_total{reason} sums what every frontend, the allocator and the runtime refused, and
    keeps counting across a replaced frontend."""
    from node.supervisor.metrics import NodeCollector, Totals
    from protocol.messages import AllocatorStats, FrontendStats, RuntimeStats

    totals = Totals()
    totals.observe("frontend.0", 1, FrontendStats(refused={"peer_bytes": 2}))
    totals.observe("frontend.0", 2, FrontendStats(refused={"peer_bytes": 1}))  # its replacement
    totals.observe("allocator", 3, AllocatorStats(refused={"peer_sessions": 4}))
    totals.observe("runtime.0", 4, RuntimeStats(refused={"queue": 5}))
    snapshot = {"state": 2, "blocks": [0, 4], "moves": 0, "actors": {}}
    families = {f.name: f for f in NodeCollector(lambda: snapshot, totals).collect()}
    samples = {s.labels["reason"]: s.value for s in families["node_refused"].samples if s.name == "node_refused_total"}
    assert samples == {"peer_bytes": 3.0, "peer_sessions": 4.0, "queue": 5.0}


def test_session_recoveries_are_exported_as_a_counter_and_a_histogram():
    """node_sessions_recovered_total and node_session_recovery_seconds, kept apart from the RPC latencies
    and counted across a replaced frontend; the history memory as gauges."""
    from node.supervisor.metrics import NodeCollector, Totals
    from protocol.messages import LATENCY_BUCKETS, AllocatorStats, FrontendStats, LatencyHistogram

    def recovery(*seconds):
        buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        for s in seconds:
            buckets[next((i for i, b in enumerate(LATENCY_BUCKETS) if s <= b), len(LATENCY_BUCKETS))] += 1
        return {"session_recovery": LatencyHistogram(buckets, sum(seconds), len(seconds))}

    totals = Totals()
    totals.observe("frontend.0", 1, FrontendStats(recovered=2, latency=recovery(0.3, 1.2)))
    totals.observe("frontend.0", 2, FrontendStats(recovered=1, latency=recovery(4.0)))  # its replacement
    allocator = AllocatorStats(history_bytes=300, history_capacity=1000, sessions_without_history=1)
    actors = {
        "frontend.0": {"restarts": 1, "ready": True, "stats": FrontendStats(history_bytes=256)},
        "allocator": {"restarts": 0, "ready": True, "stats": allocator},
    }
    snapshot = {"state": 2, "blocks": [0, 4], "moves": 0, "actors": actors}
    families = {f.name: f for f in NodeCollector(lambda: snapshot, totals).collect()}
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert value["node_sessions_recovered_total"] == 3.0
    assert value["node_session_recovery_seconds_count"] == 3.0
    assert abs(value["node_session_recovery_seconds_sum"] - 5.5) < 1e-9
    le = {s.labels["le"]: s.value for s in families["node_session_recovery_seconds"].samples if "le" in s.labels}
    assert le["0.25"] == 0.0 and le["0.5"] == 1.0 and le["2.5"] == 2.0 and le["5.0"] == 3.0
    rpcs = {s.labels.get("rpc") for s in families["node_request_seconds"].samples}
    assert "session_recovery" not in rpcs
    assert value["node_history_bytes"] == 256 and value["node_history_bytes_capacity"] == 1000
    assert value["node_history_bytes_reserved"] == 300 and value["node_sessions_without_history"] == 1


def test_the_stream_keepers_figures_are_exported():
    """node_streams_kept, node_stream_log_bytes, node_calls_held, and node_streams_handed_over_total and
    node_calls_resent_total across a replaced keeper."""
    from node.supervisor.metrics import NodeCollector, Totals
    from protocol.messages import KeeperStats

    totals = Totals()
    totals.observe("keeper", 1, KeeperStats(resumed=2, calls_resent=4, refused={"peer_bytes": 1}))
    totals.observe("keeper", 2, KeeperStats(resumed=1, calls_resent=1))  # its replacement counts from zero
    stats = KeeperStats(streams=3, kept=2, log_bytes=4096, calls=5)
    actors = {"keeper": {"restarts": 1, "ready": True, "stats": stats}}
    snapshot = {"state": 2, "blocks": [0, 4], "moves": 0, "actors": actors}
    families = {f.name: f for f in NodeCollector(lambda: snapshot, totals).collect()}
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert value["node_streams_handed_over_total"] == 3.0 and value["node_calls_resent_total"] == 5.0
    assert value["node_calls_held"] == 5
    assert value["node_streams_kept"] == 2 and value["node_stream_log_bytes"] == 4096
    refused = {s.labels["reason"]: s.value for s in families["node_refused"].samples if s.name == "node_refused_total"}
    assert refused == {"peer_bytes": 1.0}
