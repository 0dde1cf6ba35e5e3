"""The node under process managers: supervisord with the repository's supervisor.conf, and systemd's
notify protocol (node/units/petals-node.service) checked with a socket the test binds itself."""

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

from node.launcher import NodeProcess
from node.sd_notify import Notifier
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
        assert node_processes(str(run_dir)), "the node's processes are visible"
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
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify"))
    server.settimeout(0.5)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    node = NodeProcess(MICRO_LLAMA, tmp_path / "sd", dht_prefix="micro-sd2", env=env).start()
    try:
        messages = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                messages.append(server.recv(4096).decode())
            except socket.timeout:
                pass
    finally:
        node.stop()
    while True:
        try:
            messages.append(server.recv(4096).decode())
        except socket.timeout:
            break
    ready = [m for m in messages if m.startswith("READY=1")]
    assert len(ready) == 1 and "STATUS=ONLINE" in ready[0] and f"MAINPID={node.proc.pid}" in ready[0]
    assert sum(m == "WATCHDOG=1" for m in messages) >= 3  # every 0.5 s while healthy
    assert messages[-1].startswith("STOPPING=1") or any(m.startswith("STOPPING=1") for m in messages[-3:])


def test_metrics_are_scraped_in_prometheus_format(tmp_path):
    import urllib.request

    import torch
    from prometheus_client.parser import text_string_to_metric_families

    from node.client import Client

    with NodeProcess(MICRO_LLAMA, tmp_path / "metrics", "--metrics_port", "0", dht_prefix="micro-metrics") as node:
        port = node.status["metrics_port"]
        with Client(node.maddrs, "micro-metrics") as client:
            for _ in range(3):
                client.forward(torch.randn(1, 4, 64), 0, 4)
            with client.session(max_length=4, start=0, end=4) as session:
                for t in range(4):
                    session.step(torch.randn(1, 1, 64))
            try:
                client.forward(torch.randn(1, 4, 63), 0, 4)  # a wrong hidden size: an error
            except Exception:
                pass
        time.sleep(2.5)  # the next heartbeats carry the counts
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("node_state", ())] == 2  # ONLINE
    assert samples[("node_blocks", (("end", "4"), ("start", "0")))] == 4
    assert samples[("node_requests_total", (("rpc", "rpc_forward"),))] == 4
    assert samples[("node_request_errors_total", (("rpc", "rpc_forward"),))] == 1
    assert samples[("node_request_seconds_count", (("rpc", "inference_step"),))] == 4
    assert samples[("node_request_seconds_bucket", (("le", "+Inf"), ("rpc", "inference_step")))] == 4
    assert samples[("node_actor_up", (("actor", "runtime.0"),))] == 1
    assert samples[("node_actor_restarts_total", (("actor", "runtime.0"),))] == 0
    assert samples[("node_runtime_rounds_total", ())] >= 4
    assert samples[("node_cache_bytes_left", ())] > 0
    assert ("node_queue_depth", ()) in samples and ("node_sessions_open", ()) in samples
    assert sum(v for (name, _), v in samples.items() if name == "node_batch_size_rounds_total") >= 4


def test_counters_survive_an_actor_replacement():
    from node.metrics import Monotonic

    total = Monotonic()
    assert total(("frontend.0", "calls"), 5) == 5
    assert total(("frontend.0", "calls"), 7) == 7
    assert total(("frontend.0", "calls"), 2) == 9  # the replacement counted 2 since it started
