"""`python -m node.probe` attached to the shared micro-llama node while sessions run through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import torch

from tests.helpers.paths import ROOT


class ProbeProcess:
    """The probe as a user runs it; stdout and stderr are collected by threads so neither pipe fills."""

    def __init__(self, run_dir, *args: str, duration: float = 60):
        argv = [sys.executable, "-m", "node.probe", str(run_dir), *args, "--duration", str(duration)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _drain(pipe, into: list) -> None:
        for line in pipe:
            into.append(line.rstrip("\n"))

    def wait_attached(self, actors, timeout: float = 15) -> None:
        """Steps must wait for this: events published before the subscription arrives are lost."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(f"probe: attached to {a}" in self.err for a in actors):
                return
            assert self.proc.poll() is None, f"probe exited with {self.proc.returncode}: {self.err}"
            time.sleep(0.05)
        raise TimeoutError(f"probe not attached to {actors} after {timeout} s: {self.err}")

    def wait_line(self, predicate, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not any(predicate(line) for line in list(self.out)) and time.monotonic() < deadline:
            time.sleep(0.05)

    def finish(self, interrupt: bool = True, timeout: float = 30) -> int:
        """Ctrl-C the probe (or let it end by itself) and collect everything it printed."""
        if interrupt and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(5)
        return code


def run_session(client, steps):
    """Steps of an inference session over all 4 blocks; the probe is attached before the first one."""
    torch.manual_seed(7)
    with client.session(max_length=16, start=0, end=4) as session:
        yield session.session.sessions[0].session_id
        for t in steps:
            out = session.step(torch.randn(1, t, 64))
            assert out.shape == (1, t, 64)


def test_probe_follows_one_session(micro_node, micro_client):
    session = run_session(micro_client, [4, 1, 1])
    sid = next(session)
    probe = ProbeProcess(micro_node.run_dir, "--session", sid, "--json")
    try:
        probe.wait_attached(micro_node.status["actors"])
        for _ in session:
            pass
        # the frontend frees the cache after the client has gone: let that reach the runtime
        probe.wait_line(lambda line: '"runtime.0"' in line and '"DropCache"' in line)
    finally:
        session.close()
        code = probe.finish()
    assert code == 0, probe.err
    assert not any("Traceback" in line for line in probe.err), probe.err
    events = [json.loads(line) for line in probe.out]
    assert events and all(e["session"] == sid for e in events)
    assert not any(e["dir"] == "stats" for e in events)  # --session implies --no-stats

    def seen(actor_prefix, direction, type_):
        return [
            e for e in events if e["actor"].startswith(actor_prefix) and e["dir"] == direction and e["type"] == type_
        ]

    for actor, direction in [("runtime", "in"), ("frontend", "out")]:
        steps = seen(actor, direction, "InferStep")
        assert [s["fields"]["position"] for s in steps] == [0, 4, 5], steps
        assert {s["fields"]["session"] for s in steps} == {sid}
        assert [s["fields"]["tensors"][0] for s in steps] == [["float32", [1, t, 64]] for t in (4, 1, 1)]
    # replies carry no session field: the probe matched them to their requests by req
    for actor, direction in [("runtime", "out"), ("frontend", "in")]:
        results = seen(actor, direction, "Result")
        assert len(results) == 3 and all(r["session"] == sid for r in results), results
    assert sorted(r["req"] for r in seen("runtime", "out", "Result")) == sorted(
        s["req"] for s in seen("runtime", "in", "InferStep")
    )
    assert seen("frontend", "out", "Allocate") and seen("allocator", "out", "Granted")
    # and the cache release at the end, matched by the cache handle the session held
    assert seen("frontend", "out", "Release") and seen("runtime", "in", "DropCache")


def test_probe_filters_by_actor_and_type(micro_node, micro_client):
    session = run_session(micro_client, [4, 1])
    next(session)
    probe = ProbeProcess(micro_node.run_dir, "--actor", "runtime", "--type", "InferStep", "--type", "Result")
    try:
        probe.wait_attached(["runtime.0"])
        for _ in session:
            pass
    finally:
        session.close()
        code = probe.finish()
    assert code == 0, probe.err
    assert not [line for line in probe.err if "connecting to" in line and "runtime.0" not in line], probe.err
    rows = [line.split() for line in probe.out]
    assert rows and all(r[1] == "runtime.0" for r in rows), probe.out
    assert {(r[2], r[3]) for r in rows} == {("in", "InferStep"), ("out", "Result")}, probe.out
    steps = [line for line in probe.out if " InferStep " in line]
    assert len(steps) == 2 and "tensors=[float32[1,4,64]" in steps[0] and "position=4" in steps[1], steps


def test_probe_prints_stats_of_actors_by_prefix(micro_node):
    # exits by itself after two events; stats are the only traffic an idle node has
    probe = ProbeProcess(micro_node.run_dir, "--actor", "frontend", "--count", "2", duration=20)
    assert probe.finish(interrupt=False) == 0, probe.err
    assert len(probe.out) == 2, probe.out
    for line in probe.out:
        _, actor, direction, type_, *fields = line.split()
        assert actor.startswith("frontend.") and (direction, type_) == ("stats", "Stats")
    assert {line for line in probe.err if "connecting to" in line} == {
        "probe: connecting to frontend.0",
        "probe: connecting to frontend.1",
    }


def test_probe_refuses_a_directory_without_a_node(tmp_path, micro_node):
    def probe(run_dir, *args):
        return subprocess.run(
            [sys.executable, "-m", "node.probe", str(run_dir), *args, "--duration", "5"],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=30,
        )

    done = probe(tmp_path)
    assert done.returncode == 2 and "status.json" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "status.json").write_text(json.dumps({"state": "online", "actors": {}}))
    done = probe(tmp_path)
    assert done.returncode == 2 and "no probe sockets" in done.stderr
    done = probe(micro_node.run_dir, "--actor", "nosuch")
    assert done.returncode == 2 and "--actor nosuch" in done.stderr and "runtime.0" in done.stderr


def test_probe_stats_table(micro_node):
    """--stats: one table of every actor's latest stats per second; --count bounds it, --once is one."""
    probe = ProbeProcess(micro_node.run_dir, "--stats", "--count", "2", duration=30)
    assert probe.finish(interrupt=False) == 0, probe.err
    tables = "\n".join(probe.out).split("\n\n")
    tables = [t for t in tables if t.strip()]
    assert len(tables) == 2, probe.out
    head, *lines = tables[-1].splitlines()
    assert "node online" in head and "blocks 0:4" in head, head
    rows = {line.split()[0]: line for line in lines}
    assert set(micro_node.status["actors"]) <= set(rows), rows
    assert "rounds=" in rows["runtime.0"] and "capacity_bytes=" in rows["allocator"]
    assert f"pid={micro_node.actor_pid('runtime.0')} restarts=0" in rows["runtime.0"]
    once = ProbeProcess(micro_node.run_dir, "--stats", "--once", duration=30)
    assert once.finish(interrupt=False) == 0, once.err
    assert len([t for t in "\n".join(once.out).split("\n\n") if t.strip()]) == 1, once.out


def test_probe_follows_a_session_step_by_step_with_timings(micro_node, micro_client):
    session = run_session(micro_client, [4, 1, 1])
    sid = next(session)
    probe = ProbeProcess(micro_node.run_dir, "--follow", sid, "--count", "3")
    try:
        probe.wait_attached(micro_node.status["actors"])
        for _ in session:
            pass
    finally:
        session.close()
        code = probe.finish(interrupt=False)
    assert code == 0, probe.err
    assert len(probe.out) == 3, probe.out
    assert [line.split("tokens=")[1].split(":")[0] for line in probe.out] == ["4", "1", "1"]
    for n, line in enumerate(probe.out, 1):
        assert line.startswith(f"step {n} req=") and "?" not in line and "FAILED" not in line, line
        for part in (
            "keeper ",
            "frontend ",
            "to runtime ",
            "queued ",
            "compute ",
            "back ",
            "reply ",
            "to client ",
            "total ",
        ):
            assert part in line, line


def test_probe_follow_json_timestamps_are_in_order(micro_node, micro_client):
    """--follow --json: each step's marks, from the client's request to the reply, in causal order,
    and the intervals add up to the total."""
    session = run_session(micro_client, [3, 1])
    sid = next(session)
    probe = ProbeProcess(micro_node.run_dir, "--follow", sid[:8], "--json", "--count", "2")
    try:
        probe.wait_attached(micro_node.status["actors"])
        for _ in session:
            pass
    finally:
        session.close()
        code = probe.finish(interrupt=False)
    assert code == 0, probe.err
    steps = [json.loads(line) for line in probe.out]
    assert [s["n"] for s in steps] == [1, 2] and all(s["session"] == sid for s in steps)
    for s in steps:
        # from the keeper's read of the client's message to its write of the reply
        marks = [
            s[k] for k in ("read", "received", "sent", "taken", "started", "finished", "back", "replied", "written")
        ]
        assert marks == sorted(marks), s
        parts = sum(v for k, v in s["ms"].items() if k != "total")
        assert abs(parts - s["ms"]["total"]) < 0.01 and not s["failed"], s
