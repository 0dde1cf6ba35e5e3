"""`python -m node.bench_petals`: the node against a real Petals server, both driven by a real Petals client.

    python -m node.bench_petals --petals_python PATH [--preset small|tiny|8b | --model PATH]
                                [--dtype float32|bfloat16] [--tokens N] [--sessions S] [--json FILE]
                                [--max_seconds S]

Petals pins package versions that cannot share the node's environment, so the Petals side runs under
another interpreter (--petals_python, or the PETALS_PYTHON variable, or the Petals 2.2.0 environment that
`python3 -m node.tools.petals_env` builds): a Python with `petals` installed.
On one model (a random Llama made here with a fixed seed, as node.bench makes it, or --model), one at
a time on this machine, this starts

1. the node (`python -m node.supervisor`, its defaults, a private swarm on loopback), then
2. a Petals server (`python -m petals.cli.run_server --new_swarm --num_blocks ALL`, its defaults,
   `--throughput 1` so that it does not spend a minute measuring),

and runs against each the same workload in a Petals client process (the script below, run by
--petals_python): greedy generation of N tokens after an 8-token prompt in one session; S sessions
generating at once from S threads (aggregate tokens/s); forward of 4 x 128 hidden states through all
blocks; forward and backward of the same (per call). The same client also computes each row locally
with plain transformers, so each server's figures have their local baseline from the same run.
The tokens generated through either server are checked against transformers'.

The table gives node and Petals server figures and node / Petals server (higher is better for the node).
Both servers and every process they start are stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from node.tools import petals_env
from node.tools.launcher import NodeProcess

PREFIX = "bench"

CLIENT = Path(__file__).resolve().parent / "tools" / "petals_client.py"  # run by the Petals interpreter

ROWS = (
    ("cold_start", "cold start (to ONLINE / 'Started')", "s", False),
    ("generation", "generation, 1 session", "tokens/s", True),
    ("concurrent", "generation, {sessions} sessions at once", "tokens/s", True),
    ("forward", "forward 4x128, all blocks", "tokens/s", True),
    ("backward_ms", "forward+backward 4x128 (per call)", "ms", False),
)


def run_client(petals_python: str, model: Path, peers: list[str], args, log: Path) -> dict:
    cmd = [petals_python, str(CLIENT), str(model), str(args.tokens), str(args.sessions), args.dtype, *peers]
    with log.open("w") as err:
        # its own group: the client forks a DHT process with its own p2pd, which a timeout must stop too
        client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            stdout, _ = client.communicate(timeout=args.max_seconds)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the Petals client did not finish within {args.max_seconds:.0f} s; see {log}") from None
        finally:
            try:
                os.killpg(client.pid, signal.SIGKILL)  # it holds nothing that needs a clean stop
            except ProcessLookupError:
                pass
            client.wait()
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"the Petals client gave no result (exit {client.returncode}); see {log}:\n{log.read_text()[-3000:]}"
    )


def start_petals_server(
    petals_python: str,
    model: Path,
    num_blocks: int,
    log: Path,
    prefix: str = PREFIX,
    limit: float = 300,
    dtype: str = "float32",
) -> tuple[subprocess.Popen, list[str]]:
    server = subprocess.Popen(
        [
            petals_python,
            "-m",
            "petals.cli.run_server",
            str(model),
            "--dht_prefix",
            prefix,
            "--torch_dtype",
            dtype,
            "--device",
            "cpu",
            "--num_blocks",
            str(num_blocks),
            "--throughput",
            "1",
            "--new_swarm",
            "--host_maddrs",
            "/ip4/127.0.0.1/tcp/0",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its p2pd is in its group
    )
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and server.poll() is None:
        text = log.read_text(errors="replace")
        if "Started" in text:
            for line in text.splitlines():
                if "Running a server on [" in line:
                    return server, json.loads(line.split("Running a server on ", 1)[1].replace("'", '"'))
        time.sleep(0.5)
    stop_group(server)
    raise RuntimeError(f"the Petals server did not start:\n{log.read_text(errors='replace')[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT to the whole process group (a Petals server stops cleanly on SIGINT only; on SIGTERM it leaves
    its handlers and p2pd behind), then SIGKILL to whatever is left."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            os.killpg(proc.pid, signal.SIGKILL)  # whatever else is left in the group
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
        return


def print_logs(work: Path, tail: int = 4000) -> None:
    print(f"logs kept in {work}", file=sys.stderr, flush=True)
    for log in sorted(work.glob("*.log")):
        print(f"--- {log.name}, its end:\n{log.read_text(errors='replace')[-tail:]}", file=sys.stderr, flush=True)


def num_blocks_of(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["num_hidden_layers"])


def format_table(node: dict, petals: dict, sessions: int) -> str:
    lines = [f"{'metric':38s}  {'unit':8s}  {'node':>8s}  {'local':>8s}  {'petals':>8s}  {'local':>8s}  node/petals"]
    lines.append("-" * len(lines[0]))
    for key, label, unit, higher in ROWS:
        ours, theirs = node[key], petals[key]
        ratio = ours / theirs if higher else theirs / ours
        local = [side["local_" + key] for side in (node, petals)]
        local = [f"{x:8.1f}" if x is not None else " " * 8 for x in local]  # no local figure (cold start)
        lines.append(
            f"{label.format(sessions=sessions):38s}  {unit:8s}  {ours:8.1f}  {local[0]}  "
            f"{theirs:8.1f}  {local[1]}  {ratio:.2f}"
        )
    lines.append(
        "local: plain transformers in the client process, measured in the same client run as the server "
        f"beside it; {sessions} sessions locally: one batch of {sessions}"
    )
    return "\n".join(lines)


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m node.bench_petals", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--petals_python",
        default=os.environ.get("PETALS_PYTHON") or (str(petals_env.built() or "") or None),
        help="a Python with petals installed (default: $PETALS_PYTHON, else what node.tools.petals_env built)",
    )
    p.add_argument("--preset", choices=["tiny", "small", "8b"], default="small")
    p.add_argument("--model", help="a local Llama directory instead of a preset")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both servers and the client")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--max_seconds", type=float, default=1200.0, help="the limit for each client run")
    args = p.parse_args(argv)
    if not args.petals_python:
        p.error(
            "argument --petals_python: required (or set PETALS_PYTHON, or build Petals 2.2.0 with "
            "`python3 -m node.tools.petals_env`)"
        )
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a test's or an operator's limit) unwinds like Ctrl-C, so that both servers are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = Path(tempfile.mkdtemp(prefix="bench_petals."))
    failed = True  # until the figures are in: an error or a hang keeps the logs, and shows their ends
    try:
        if args.model:
            model = Path(args.model)
        else:
            from node.tools.tinymodel import make_preset

            model = Path(make_preset(str(work / "model"), args.preset))
        print(f"model {model}; {args.sessions} sessions, {args.tokens} tokens; logs in {work}", flush=True)
        print("node: starting, then the Petals client ...", flush=True)
        node = NodeProcess(
            model, work / "node", "--torch_dtype", args.dtype, dht_prefix=PREFIX, log_path=work / "node.log"
        )
        began = time.monotonic()
        with node:  # started: ONLINE in its DHT
            node_start = time.monotonic() - began
            ours = run_client(args.petals_python, model, node.maddrs, args, work / "client_node.log")
        ours["cold_start"], ours["local_cold_start"] = node_start, None
        print("Petals server: starting, then the Petals client ...", flush=True)
        began = time.monotonic()
        server, maddrs = start_petals_server(
            args.petals_python,
            model,
            num_blocks_of(model),
            work / "petals_server.log",
            limit=args.max_seconds,
            dtype=args.dtype,
        )
        petals_start = time.monotonic() - began
        try:
            theirs = run_client(args.petals_python, model, maddrs, args, work / "client_petals.log")
        finally:
            stop_group(server)
        theirs["cold_start"], theirs["local_cold_start"] = petals_start, None
        print()
        print(format_table(ours, theirs, args.sessions))
        print(
            f"tokens through the node equal transformers': {ours['tokens_match']}; "
            f"through the Petals server: {theirs['tokens_match']}"
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"node": ours, "petals": theirs, "sessions": args.sessions, "tokens": args.tokens}, indent=1)
            )
        failed = not ours["tokens_match"]
        return 1 if failed else 0
    finally:
        if failed:
            print_logs(work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
