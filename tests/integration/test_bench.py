"""Smoke test of the benchmark (`python -m node.bench`): it runs end to end and reports every figure.

Only that: no speed threshold is asserted here (performance is measured by running the benchmark,
never in timed unit tests). Repetitions are cut to the minimum so that the test stays short.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

from node.tools.launcher import ROOT


def test_bench_smoke(tmp_path):
    report = tmp_path / "bench.json"
    argv = [
        sys.executable,
        "-m",
        "node.bench",
        "--preset",
        "tiny",
        "--tokens",
        "8",
        "--repeats",
        "1",
        "--gen_repeats",
        "1",
        "--warmup",
        "1",
        "--max_seconds",
        "150",
        "--json",
        str(report),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmark stops its node on SIGTERM
        try:
            out, _ = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        raise AssertionError(f"the benchmark did not finish in time:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]

    data = json.loads(report.read_text())
    expected = {"cold_start", "generation", "concurrent", "forward", "backward", "session_recovery", "step", "peak_pss"}
    assert set(data["metrics"]) == expected
    for name, m in data["metrics"].items():
        for key in ("node", "local", "ratio"):
            value = m[key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, key, value)
    for key, value in data["per_token"].items():
        assert isinstance(value, (int, float)) and value > 0, (key, value)
    assert (data["settings"]["device"], data["settings"]["dtype"], data["settings"]["quant_type"]) == (
        "cpu",
        "float32",
        "none",
    )  # stated, whatever the machine's defaults (on a GPU host: cuda and nf4)
    assert data["machine"]["cpu_count"] > 0 and data["machine"]["torch_threads"] > 0
    # the machine's own bound, measured in the same run, and the forward as a fraction of it
    bound = data["bound"]
    assert all(bound[k] > 0 for k in ("memory_gb_s", "matmul_gflop_s", "decode_step_ms", "forward_tokens_s"))
    assert 0 < bound["forward_fraction"] < 1.5 and "this machine's bound (float32, torch alone)" in out
    assert data["model"]["num_blocks"] == 8 and data["model"]["hidden_size"] == 256
    # the node computes what transformers computes (float32): same tokens, same outputs
    assert data["checks"]["generated_tokens_match"] is True
    assert data["checks"]["concurrent_tokens_match"] is True
    assert data["checks"]["forward_max_rel_err"] < 1e-4 and data["checks"]["backward_max_rel_err"] < 1e-4
    # a session whose runtime was killed: rebuilt, and its next step what transformers computes
    assert data["checks"]["recovery_rel_err"] < 1e-4
    # the fixed cost of a step: the node's own account (keeper to keeper) holds the runtime's compute
    cost = data["step_cost"]
    assert cost["steps"] == 200 and cost["in_node_s"] > cost["compute_s"] > 0 and cost["fixed_s"] > 0
    assert cost["client_s"] > cost["in_node_s"] and cost["bare_rpc_s"] > 0
    assert "the node adds" in out and "a bare RPC between two p2pd daemons" in out
    assert data["recovery"]["tokens"] == 512 and data["recovery"]["restart_s"] > 0
    # what moving the forward's and backward's bytes costs any server: measured, and the rows against it
    transport = data["transport"]
    assert transport["backward_s"] > 0 and transport["forward_s"] > 0
    assert "the transport floor" in out and "transformers' layers plus it against the node: forward" in out

    # the table is printed, with its ratio column explained
    assert "generation, 1 session, batch 1, 8 tokens" in out
    assert "higher is better for the node" in out
