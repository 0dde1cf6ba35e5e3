"""The node under process managers: supervisord with the repository's supervisor.conf, and systemd's
notify protocol (node/supervisor/units/petals-node.service) checked with a socket the test binds itself."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from node.tools.launcher import NodeProcess
from node.supervisor.sd_notify import Notifier
from tests.conftest import MICRO_LLAMA, ROOT

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


def wait_for(what, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def test_supervisord_starts_and_stops_the_node(tmp_path):
    pytest.importorskip("supervisor")
    run_dir = tmp_path / "run"
    ours = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    ours.read(ROOT / "supervisor.conf")
    program = dict(ours["program:petals-node"])
    program.pop("user", None)  # the tests run as whoever runs them
    program.update(
        command=f"{sys.executable} -m node.supervisor --model {MICRO_LLAMA} --dht_prefix micro-sd --new_swarm "
        f"--host_maddrs /ip4/127.0.0.1/tcp/0 --torch_dtype float32 --num_handlers 1 --throughput 1.0 --run_dir {run_dir}",
        directory=str(ROOT),
        stdout_logfile=str(tmp_path / "node.log"),
        environment=f'PYTHONUNBUFFERED="1",PYTHONPATH="{ROOT}"',
    )
    conf = configparser.RawConfigParser()
    sock = tmp_path / "supervisor.sock"
    conf["unix_http_server"] = {"file": str(sock)}
    conf["supervisord"] = {"logfile": str(tmp_path / "supervisord.log"), "pidfile": str(tmp_path / "supervisord.pid"),
                           "nodaemon": "false", "childlogdir": str(tmp_path)}
    conf["rpcinterface:supervisor"] = {"supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"}
    conf["supervisorctl"] = {"serverurl": f"unix://{sock}"}
    conf["program:petals-node"] = program
    path = tmp_path / "supervisord.conf"
    with open(path, "w") as f:
        conf.write(f)
    ctl = [str(BIN / "supervisorctl"), "-c", str(path)]
    subprocess.run([str(BIN / "supervisord"), "-c", str(path)], check=True, timeout=30)
    try:
        status = run_dir / "status.json"
        wait_for("the node ONLINE under supervisord",
                 lambda: status.exists() and json.loads(status.read_text() or "{}").get("state") == "online", 90)
        running = node_processes(str(run_dir))
        assert any("p2pd" in " ".join(p.cmdline()) for p in running), "p2pd is among the node's processes"
        assert len(running) >= 5, "supervisor, p2pd, announcer, allocator, runtime, frontend"
        out = subprocess.run(ctl + ["stop", "petals-node"], capture_output=True, text=True, timeout=60)
        assert "stopped" in out.stdout, out.stdout + out.stderr
        wait_for("every process of the node gone", lambda: not node_processes(str(run_dir)), 20)
        assert "OFFLINE" in (tmp_path / "node.log").read_text()
        state = subprocess.run(ctl + ["status", "petals-node"], capture_output=True, text=True, timeout=30).stdout
        assert "STOPPED" in state
    finally:
        subprocess.run(ctl + ["shutdown"], capture_output=True, timeout=60)
        for proc in node_processes(str(run_dir)) + node_processes(str(path)):
            proc.kill()


def test_systemd_unit_is_valid(tmp_path):
    """The unit parses without a complaint from systemd-analyze (where installed) and asks for what the
    node implements."""
    text = (ROOT / "node" / "supervisor" / "units" / "petals-node.service").read_text()
    unit = configparser.RawConfigParser(strict=False)
    unit.read_string(text.replace("\\\n", " "))
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main" and service["KillMode"] in ("mixed", "control-group")
    assert int(service["WatchdogSec"]) > 0 and int(service["TimeoutStopSec"]) > 10 + 5  # --shutdown_grace, then stopping
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
    assert notifier.stopping() and server.recv(4096).startswith(b"STOPPING=1")
    assert not Notifier({}).ready("ONLINE")  # outside systemd: nothing, no error
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"node-test-{os.getpid()}"
    abstract.bind("\0" + name)
    abstract.settimeout(2)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("x") and abstract.recv(100) == b"STATUS=x"


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


def scrape(port: int) -> dict:
    """{(sample name, sorted labels): value} of the node's /metrics, parsed by prometheus_client."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def scrape_until(port: int, what: str, predicate, timeout: float = 15.0) -> dict:
    """Scrape until `predicate(samples)` holds: counts arrive with the actors' next heartbeats."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {sorted(samples.items())}")
        time.sleep(0.3)


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
                held = scrape_until(port, "a session holding cache", lambda s: s[("node_sessions_open", ())] == 1)
            with pytest.raises(Exception):
                client.forward(torch.randn(1, 4, 63), 0, 4)  # a wrong hidden size: an error
        samples = scrape_until(port, "4 forwards counted", lambda s: s.get(forward) == 4)
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


def test_metrics_totals_survive_an_actor_replacement():
    from node.supervisor.metrics import LATENCY_BUCKETS, Totals
    from node.frontend import handlers as rpc_handlers
    from protocol.messages import FrontendStats, RuntimeStats

    assert LATENCY_BUCKETS == rpc_handlers.LATENCY_BUCKETS  # one tuple, in protocol/messages.py
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


def test_a_taken_metrics_port_stops_the_node_with_a_message(tmp_path):
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    node = NodeProcess(MICRO_LLAMA, tmp_path / "taken", "--metrics_port", str(taken.getsockname()[1]), dht_prefix="micro-taken")
    try:
        node.launch()
        assert node.proc.wait(60) == 1
    finally:
        node.stop()
        taken.close()
    assert "cannot serve metrics" in node.log_tail()


def test_deferred_import_loads_on_first_use_and_keeps_sympy_out_of_the_runtime():
    script = textwrap.dedent(
        """
        import sys, types
        from node.startup import defer
        defer("xml.dom.minidom")
        import xml.dom.minidom as stub
        assert type(stub).__name__ == "_Deferred" and "xml.dom.expatbuilder" not in sys.modules
        assert stub.parseString("<a/>").documentElement.tagName == "a"  # the first read imports it
        assert type(sys.modules["xml.dom.minidom"]) is types.ModuleType and sys.modules["xml.dom"].minidom is sys.modules["xml.dom.minidom"]
        import torch, procs.runtime  # the runtime process's imports: transformers without torch.distributed.tensor
        assert "sympy" not in sys.modules, "sympy imported"
        from torch.distributed.tensor import DTensor  # and who needs it still gets it
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.strip() == "OK", result.stderr[-3000:]


def test_stats_report_interval_logs_what_the_node_did_and_num_blocks_is_capped(tmp_path):
    """--stats_report_interval logs one 'stats' event each interval; --num_blocks over the model's 4
    blocks serves all 4 (Petals caps it too) instead of refusing to start."""
    import torch

    from node.client.swarm import Client

    node = NodeProcess(MICRO_LLAMA, tmp_path / "stats", "--num_blocks", "14", "--stats_report_interval", "0.5",
                       "--mean_block_selection_delay", "0", dht_prefix="micro-stats")
    with node:
        assert node.status["blocks"] == [0, 4]
        with Client(node.maddrs, "micro-stats") as client:
            client.forward(torch.randn(1, 4, 64), 0, 4)
        wait_for("a stats event that counts the forward",
                 lambda: any(e.get("event") == "stats" and e.get("requests", 0) >= 1 for e in node.log_events()), timeout=20)
    reports = [e for e in node.log_events() if e.get("event") == "stats"]
    assert {"rounds", "busy_share", "queue", "sessions", "cache_used_bytes", "requests_in_flight", "errors"} <= set(reports[-1])
    assert any("--num_blocks is larger than the model" in e.get("event", "") for e in node.log_events())
