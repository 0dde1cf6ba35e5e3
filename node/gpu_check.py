"""`python -m node.gpu_check`: the one-shot GPU check, for the minutes a GPU is at hand (at most 8 on one H100).

    python -m node.gpu_check [--out DIR] [--device cuda|cuda:N] [--budget SECONDS] [--no_bench]

Run from a checkout with the test extras installed (`bash .ci/install`, then a CUDA build of torch). Without a
CUDA device it says so and exits 0. With one, in this order, each step bounded so that the whole fits the
budget, writing everything to DIR (default ./gpu_check):

1. versions.json: torch, CUDA, cuDNN, bitsandbytes and transformers versions, every visible GPU, and the
   device the node would choose here (node/supervisor/resolve.py) with CUDA_VISIBLE_DEVICES as it is.
2. tests/gpu (pytest, marker `gpu`; pytest.log, figures.jsonl): every family's blocks on the
   device in float32 and bfloat16 against the CPU in float32 (batched sessions, a chunked prefill, decode,
   hypo_ids and rollback, backward), fused attention kernels required in bfloat16, host syncs counted;
   nf4 and int8 per family with a backward; the capacity measurement and a block's load time; a micro node
   on the device passing the CPU node's checks and rebuilding a session after its runtime is killed.
3. node.bench on the device in bfloat16: the small preset, then the 8B-shape preset (bench_small.json,
   bench_8b.json and their printed tables), each only if the budget still allows it.
4. summary.txt: what passed, what failed, where the figures are.

Eight files in all, as many as the lent GPU machine sends back from its $OUT.

The exit code is 0 when every step that ran passed. docs/testing.md describes the expected output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def versions(device: str) -> dict:
    import torch

    from node.supervisor import resolve

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "capability": list(torch.cuda.get_device_capability(i)),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 2),
            }
            for i in range(torch.cuda.device_count())
        ],
        "checked_device": device,
    }
    for package in ("transformers", "bitsandbytes", "hivemind"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception as e:  # a missing package is a finding, not a crash of the check
            info[package] = f"unavailable: {e}"
    try:
        info["node_default_device"] = resolve.resolve_device(None)
        info["node_cuda_available"] = resolve.cuda_available()
    except Exception as e:
        info["node_default_device"] = f"error: {e}"
    return info


def run_step(name: str, cmd: list[str], out: Path, timeout: float, env: dict) -> dict:
    began = time.monotonic()
    log = out / f"{name}.log"
    try:
        with log.open("w") as f:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    result = {"step": name, "exit": code, "seconds": round(time.monotonic() - began, 1), "log": str(log)}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check", help="folder for the results (default ./gpu_check)")
    p.add_argument("--device", default="cuda", help="the GPU to check (default cuda)")
    p.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480: 8 minutes)")
    p.add_argument("--no_bench", action="store_true", help="only the versions and the tests")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            f"no CUDA device here (torch {torch.__version__}, built with CUDA {torch.version.cuda}): nothing to check"
        )
        return 0
    began = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.jsonl").unlink(missing_ok=True)
    info = versions(args.device)
    (out / "versions.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)

    env = {**os.environ, "NODE_CHECK_DEVICE": args.device, "NODE_CHECK_OUT": str(out), "PYTHONPATH": str(ROOT)}
    left = lambda: args.budget - (time.monotonic() - began)  # noqa: E731
    steps = [
        run_step(
            "pytest",
            [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rA", "-p", "no:cacheprovider"]
            + ["-o", "timeout=240"],
            out,
            min(300.0, left() - 10),
            env,
        )
    ]
    if not args.no_bench:
        common = ["--device", "cuda", "--dtype", "bfloat16", "--tokens", "16", "--repeats", "3"]
        common += ["--gen_repeats", "1", "--sessions", "4", "--warmup", "1"]
        for preset, need in (("small", 60), ("8b", 120)):
            if left() < need:
                steps.append({"step": f"bench_{preset}", "exit": "skipped: the budget is spent"})
                continue
            cmd = [sys.executable, "-m", "node.bench", "--preset", preset, *common]
            cmd += ["--json", str(out / f"bench_{preset}.json"), "--max_seconds", str(int(left() - 15))]
            steps.append(run_step(f"bench_{preset}", cmd, out, left() - 5, env))

    lines = [f"GPU check, {time.strftime('%Y-%m-%d %H:%M:%S')}, {round(time.monotonic() - began)} s"]
    lines += [f"  {info['gpus'][0]['name'] if info['gpus'] else '?'}, torch {info['torch']}, CUDA {info['cuda']}"]
    lines += [f"  {s['step']}: {'passed' if s['exit'] == 0 else 'FAILED (' + str(s['exit']) + ')'}" for s in steps]
    lines += [f"  figures: {out / 'figures.jsonl'}; logs: {out}"]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(s["exit"] == 0 for s in steps if not str(s["exit"]).startswith("skipped")) else 1


if __name__ == "__main__":
    sys.exit(main())
