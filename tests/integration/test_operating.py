"""A node under process managers and operators' tools: supervisord with the repository's supervisor.conf,
systemd's notify protocol (node/supervisor/units/petals-node.service) checked with a socket the test binds
itself, Prometheus metrics, and the periodic stats report."""

from __future__ import annotations

import configparser
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from node.tools.launcher import NodeProcess
from tests.helpers.metrics import scrape_until
from tests.helpers.paths import MICRO_LLAMA, ROOT
from tests.helpers.waiting import wait_until

BIN = Path(sys.executable).parent


def node_processes(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_supervisord_starts_and_stops_the_node(tmp_path):
    pytest.importorskip("supervisor")
    run_dir = tmp_path / "run"
    ours = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    ours.read(ROOT / "supervisor.conf")
    program = dict(ours["program:petals-node"])
    program.pop("user", None)  # the tests run as whoever runs them
    program.update(
        command=f"{sys.executable} -m node.supervisor --model {MICRO_LLAMA} --dht_prefix micro-sd --new_swarm "
        "--host_maddrs /ip4/127.0.0.1/tcp/0 --torch_dtype float32 --num_handlers 1 --throughput 1.0 "
        f"--run_dir {run_dir}",
        directory=str(ROOT),
        stdout_logfile=str(tmp_path / "node.log"),
        environment=f'PYTHONUNBUFFERED="1",PYTHONPATH="{ROOT}"',
    )
    conf = configparser.RawConfigParser()
    sock = tmp_path / "supervisor.sock"
    conf["unix_http_server"] = {"file": str(sock)}
    conf["supervisord"] = {
        "logfile": str(tmp_path / "supervisord.log"),
        "pidfile": str(tmp_path / "supervisord.pid"),
        "nodaemon": "false",
        "childlogdir": str(tmp_path),
    }
    conf["rpcinterface:supervisor"] = {
        "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
    }
    conf["supervisorctl"] = {"serverurl": f"unix://{sock}"}
    conf["program:petals-node"] = program
    path = tmp_path / "supervisord.conf"
    with open(path, "w") as f:
        conf.write(f)
    ctl = [str(BIN / "supervisorctl"), "-c", str(path)]
    subprocess.run([str(BIN / "supervisord"), "-c", str(path)], check=True, timeout=30)
    try:
        status = run_dir / "status.json"
        wait_until(
            lambda: status.exists() and json.loads(status.read_text() or "{}").get("state") == "online",
            90,
            what="the node ONLINE under supervisord",
        )
        running = node_processes(str(run_dir))
        assert any("p2pd" in " ".join(p.cmdline()) for p in running), "p2pd is among the node's processes"
        assert len(running) >= 5, "supervisor, p2pd, announcer, allocator, runtime, frontend"
        out = subprocess.run(ctl + ["stop", "petals-node"], capture_output=True, text=True, timeout=60)
        assert "stopped" in out.stdout, out.stdout + out.stderr
        wait_until(lambda: not node_processes(str(run_dir)), 20, what="every process of the node gone")
        assert "OFFLINE" in (tmp_path / "node.log").read_text()
        state = subprocess.run(ctl + ["status", "petals-node"], capture_output=True, text=True, timeout=30).stdout
        assert "STOPPED" in state
    finally:
        subprocess.run(ctl + ["shutdown"], capture_output=True, timeout=60)
        for proc in node_processes(str(run_dir)) + node_processes(str(path)):
            proc.kill()


def test_node_notifies_ready_watchdog_and_stopping(tmp_path):
    """The datagrams a real node sends to $NOTIFY_SOCKET, in order: STATUS=JOINING while it loads,
    READY=1 with STATUS=ONLINE once, WATCHDOG=1 every WATCHDOG_USEC/2 while it serves, STOPPING=1 at
    SIGTERM, then only STATUS= (OFFLINE) until it exits."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify"))
    server.settimeout(0.5)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    messages: list[tuple[float, str]] = []

    def receive(until: float) -> None:
        while time.monotonic() < until:
            try:
                messages.append((time.monotonic(), server.recv(4096).decode()))
            except socket.timeout:
                if until == float("inf"):
                    return

    node = NodeProcess(MICRO_LLAMA, tmp_path / "sd", dht_prefix="micro-sd2", env=env).start()
    try:
        receive(time.monotonic() + 3)
    finally:
        node.stop()
    receive(float("inf"))  # what was sent while stopping
    server.close()
    texts = [m for _, m in messages]
    ready = [i for i, m in enumerate(texts) if m.startswith("READY=1")]
    assert len(ready) == 1, texts
    assert "STATUS=ONLINE" in texts[ready[0]] and f"MAINPID={node.proc.pid}" in texts[ready[0]]
    assert any(m.startswith("STATUS=JOINING") for m in texts[: ready[0]]), texts
    stopping = [i for i, m in enumerate(texts) if m.startswith("STOPPING=1")]
    assert len(stopping) == 1 and stopping[0] > ready[0], texts
    assert all(m.startswith("STATUS=") for m in texts[stopping[0] + 1 :]), texts
    assert any("OFFLINE" in m for m in texts[stopping[0] :]), texts
    pings = [t for (t, m) in messages[ready[0] : stopping[0]] if m == "WATCHDOG=1"]
    assert len(pings) >= 4, texts  # 3 s at one every 0.5 s
    # Times are when this test read each datagram: a stalled test reads two queued pings back to back, so
    # "no flood" is judged by the count over the serving window (one per 0.5 s), and "never very late" by
    # the widest gap, generous because a loaded 2-core CI machine stalls both processes at times (the
    # unit's WatchdogSec=60 leaves ample room).
    window = messages[stopping[0]][0] - messages[ready[0]][0]
    assert len(pings) <= window / 0.5 + 2, (window, texts)
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 2.5, gaps


def test_metrics_are_scraped_in_prometheus_format(tmp_path):
    import torch

    from node.client.swarm import Client

    forward = ("node_requests_total", (("rpc", "rpc_forward"),))
    with NodeProcess(MICRO_LLAMA, tmp_path / "metrics", "--metrics_port", "0", dht_prefix="micro-metrics") as node:
        port = node.status["metrics_port"]
        with Client(node.maddrs, "micro-metrics") as client:
            for _ in range(3):
                client.forward(torch.randn(1, 4, 64), 0, 4)
            with client.session(max_length=4, start=0, end=4) as session:
                for t in range(4):
                    session.step(torch.randn(1, 1, 64))
                # the frontend's count and the allocator's arrive with their own heartbeats: wait for both
                held = scrape_until(
                    port,
                    "a session holding cache",
                    lambda s: s[("node_sessions_open", ())] == 1 and s.get(("node_cache_tokens_used", ())) == 2 * 4 * 4,
                )
            with pytest.raises(Exception):
                client.forward(torch.randn(1, 4, 63), 0, 4)  # a wrong hidden size: an error
        timed = ("node_steps_timed_total", ())
        # every actor reports on its own heartbeat: wait until each has reported the calls above
        samples = scrape_until(
            port,
            "4 forwards counted and the session's end reported",
            lambda s: (
                s.get(forward) == 4
                and s.get(timed) == 4
                and s.get(("node_cache_tokens_used", ())) == 0
                and s.get(("node_sessions_open", ())) == 0
                and s.get(("node_runtime_tasks_total", (("outcome", "done"),)), 0) >= 7
            ),
        )
        # the 4 steps timed by the stream keeper, and the blocks' compute in them (the close has no reply)
        assert samples[("node_step_seconds_total", ())] > samples[("node_step_compute_seconds_total", ())] > 0
        # Petals' unit is one K or V row of one block: K and V of 4 positions over 4 blocks
        assert held[("node_cache_tokens_used", ())] == 2 * 4 * 4
        assert held[("node_cache_bytes_used", ())] > 0
        assert samples[("node_state", ())] == 2  # ONLINE
        assert samples[("node_blocks", (("end", "4"), ("start", "0")))] == 4
        assert samples[("node_request_errors_total", (("rpc", "rpc_forward"),))] == 1
        assert samples[("node_request_seconds_count", (("rpc", "inference_step"),))] == 4
        assert samples[("node_request_seconds_bucket", (("le", "+Inf"), ("rpc", "inference_step")))] == 4
        assert samples[("node_request_seconds_count", (("rpc", "rpc_forward"),))] == 4
        assert samples[("node_request_seconds_sum", (("rpc", "rpc_forward"),))] > 0
        assert samples[("node_actor_up", (("actor", "runtime.0"),))] == 1
        assert samples[("node_actor_restarts_total", (("actor", "runtime.0"),))] == 0
        assert samples[("node_runtime_rounds_total", ())] >= 4
        assert samples[("node_runtime_tasks_total", (("outcome", "done"),))] >= 7
        assert samples[("node_cache_bytes_left", ())] > 0 and samples[("node_cache_tokens_left", ())] > 0
        assert samples[("node_cache_tokens_used", ())] == 0 and samples[("node_sessions_open", ())] == 0
        assert ("node_queue_depth", ()) in samples and ("node_requests_in_flight", ()) in samples
        assert sum(v for (name, _), v in samples.items() if name == "node_batch_size_rounds_total") >= 4

        # a replaced frontend counts from zero; the node's counters must not go back
        pid = node.actor_pid("frontend.0")
        os.kill(pid, 9)
        node.wait_ready("frontend.0", pid, timeout=60)
        with Client(node.maddrs, "micro-metrics") as client:
            client.forward(torch.randn(1, 4, 64), 0, 4)
        after = scrape_until(port, "the forward after the restart counted", lambda s: s.get(forward) == 5)
        assert after[("node_actor_restarts_total", (("actor", "frontend.0"),))] == 1
        assert after[("node_request_errors_total", (("rpc", "rpc_forward"),))] == 1
        assert after[("node_request_seconds_count", (("rpc", "inference_step"),))] == 4


def test_a_taken_metrics_port_stops_the_node_with_a_message(tmp_path):
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    node = NodeProcess(
        MICRO_LLAMA, tmp_path / "taken", "--metrics_port", str(taken.getsockname()[1]), dht_prefix="micro-taken"
    )
    try:
        node.launch()
        assert node.proc.wait(60) == 1
    finally:
        node.stop()
        taken.close()
    assert "cannot serve metrics" in node.log_tail()


def test_stats_report_interval_logs_what_the_node_did_and_num_blocks_is_capped(tmp_path):
    """--stats_report_interval logs one 'stats' event each interval; --num_blocks over the model's 4
    blocks serves all 4 (Petals caps it too) instead of refusing to start."""
    import torch

    from node.client.swarm import Client

    node = NodeProcess(
        MICRO_LLAMA,
        tmp_path / "stats",
        "--num_blocks",
        "14",
        "--stats_report_interval",
        "0.5",
        "--mean_block_selection_delay",
        "0",
        dht_prefix="micro-stats",
    )
    with node:
        assert node.status["blocks"] == [0, 4]
        with Client(node.maddrs, "micro-stats") as client:
            client.forward(torch.randn(1, 4, 64), 0, 4)
        wait_until(
            lambda: any(e.get("event") == "stats" and e.get("requests", 0) >= 1 for e in node.log_events()),
            timeout=20,
            what="a stats event that counts the forward",
        )
    reports = [e for e in node.log_events() if e.get("event") == "stats"]
    assert {"rounds", "busy_share", "queue", "sessions", "cache_used_bytes", "requests_in_flight", "errors"} <= set(
        reports[-1]
    )
    assert any("--num_blocks is larger than the model" in e.get("event", "") for e in node.log_events())
