"""`python -m node.bench`: the node against plain transformers on the same machine, in the same run.

    python -m node.bench [--model PATH | --preset micro|tiny|small|8b] [--tokens N] [--json FILE]
                         [--dtype float32|bfloat16] [--device cpu|cuda] [--quant_type none|int8|nf4]
                         [--repeats R] [--gen_repeats G] [--warmup W] [--max_seconds S]

Makes a random Llama with a fixed seed (unless --model is given), starts a node serving all of its
blocks in a private swarm on loopback (`python -m node.supervisor ...`, one handler), measures the cold
start to ONLINE, then measures the same work through the node (with the project's client, as a
Petals client does it) and in plain transformers in this process:

- generation: greedy, batch 1, an 8-token prompt, N new tokens in one inference session; the node side
  includes the client's embeddings, final norm and LM head; transformers runs the whole model with
  its KV cache (a manual loop with past_key_values, as `generate` does without its extras). Both
  produce the same tokens in float32, which is checked;
- forward: hidden states of 4 x 128 tokens through all blocks (one rpc_forward per call) against the
  HF model's decoder layers over the same hidden states (no embeddings, no LM head);
- backward: input gradients for the same 4 x 128 (one rpc_backward per call, as a Petals client's
  backward pass sends it) against autograd through the decoder layers; both sides start from
  (inputs, grad_outputs), so both include the forward that autograd needs;
- session recovery: a session of 512 tokens whose runtime is killed with -9: the time until the
  replacement is ready, then its next step (the cache rebuilt from the session's history, then the
  step) against the same 513 tokens through transformers' layers (node/tools/recovery_timing.py);
- peak memory: PSS of every process of the node (supervisor and descendants, p2pd included),
  sampled during the run, against a fresh python process that loads the model in transformers once
  the node has stopped and runs the same forward, backward and a short generation once.

- this machine's bound (node/tools/machine_bound.py, measured once the node has stopped): the memory
  bandwidth and the matrix-product speed of torch alone, hence the least time a decode step and the
  forward can take; the forward of the node and of transformers as a fraction of it.
- the transport floor (node/tools/bare_rpc.py, measured once the node has stopped): the forward's and
  the backward's bytes sent and returned between two bare p2pd daemons, serialized and in parts as a
  Petals client sends them, nothing computed. Transformers' layers in this process never pay it, any
  server does: the node is also compared with transformers' time plus this floor.

The table gives node and local figures and their ratio, oriented so that higher is better for the
node (node/local for tokens/s, local/node for seconds and MiB); below it, where a generated token's
time goes on the client side (embeddings + norm + LM head vs. the session.step round trip).
Repetitions alternate node and local so that slow phases of a busy machine hit both; figures are medians.
The client and the node share this machine's cores (the local figures run while the node is idle).
Torch threads are left at their defaults on both sides, as the node's runtime has them.
The node is always stopped, also on errors, Ctrl-C, SIGTERM or when --max_seconds runs out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch

from node.client.generate import BatchedHead
from node.startup import die_with_parent
from node.tools import bare_rpc, machine_bound
from node.tools.launcher import ROOT, NodeProcess
from node.tools.local_baseline import local_backward, local_forward, local_generate, local_layers_forward, sync
from node.tools.recovery_timing import RECOVERY_TOKENS, measure_session_recovery

PROMPT = [1, 15, 27, 99, 4, 63, 250, 7]
STEP_COST_STEPS, STEP_COST_WARMUP = 200, 20  # one-token steps timed for the fixed cost of a step
BATCH, LENGTH = 4, 128  # the forward/backward shape: 4 sequences of 128 tokens
MIB = 1024 * 1024


class BenchTimeout(Exception):
    pass


class PssSampler:
    """Max over time of the summed PSS of a set of processes (given by a function returning pids)."""

    def __init__(self, pids: Callable[[], list[int]], every: float = 0.5):
        self.pids = pids
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def sample(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def start(self) -> "PssSampler":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.peak


# --- the node side: the project's client ------------------------------------------------------------


def node_generate(
    client, head, route, prompt: torch.Tensor, new_tokens: int, device: torch.device, timing: dict
) -> torch.Tensor:
    """greedy_generate (node/client/generate.py) with the route found once, as a Petals client caches it,
    and timestamps."""
    total = prompt.shape[1] + new_tokens
    tokens = prompt
    head_s, step_s = [], []
    with client.session(max_length=total, start=0, end=head.num_blocks, route=route) as session:
        began = time.perf_counter()
        hidden = session.step(head.embed(prompt.to(device)))
        prefill = time.perf_counter() - began
        while True:
            began = time.perf_counter()
            next_token = head.logits(hidden[:, -1:].to(device)).argmax(-1)
            sync(device)
            head_s.append(time.perf_counter() - began)
            tokens = torch.cat([tokens, next_token.cpu()], dim=1)
            if tokens.shape[1] >= total:
                break
            began = time.perf_counter()
            embedded = head.embed(next_token)
            sync(device)
            middle = time.perf_counter()
            hidden = session.step(embedded)
            done = time.perf_counter()
            head_s[-1] += middle - began
            step_s.append(done - middle)
    timing.setdefault("prefill_s", []).append(prefill)
    timing.setdefault("head_s", []).extend(head_s)
    timing.setdefault("step_s", []).extend(step_s)
    return tokens


def node_generate_concurrently(
    client, head, route, prompts: torch.Tensor, new_tokens: int, device: torch.device
) -> torch.Tensor:
    """One inference session per row of `prompts`, all at once (asyncio): independent sessions through
    the node, with the client's LM head batched over the sessions ready together (BatchedHead)."""
    swarm = client.swarm
    total = prompts.shape[1] + new_tokens
    batched = BatchedHead(head)

    async def one(prompt: torch.Tensor) -> torch.Tensor:
        tokens = prompt
        batched.join()
        try:
            async with swarm.inference_session(max_length=total, start=0, end=head.num_blocks, route=route) as session:
                hidden = await session.step(head.embed(prompt.to(device)))
                while True:
                    next_token = (await batched.logits(hidden[:, -1:].to(device))).argmax(-1).cpu()
                    tokens = torch.cat([tokens, next_token], dim=1)
                    if tokens.shape[1] >= total:
                        return tokens
                    hidden = await session.step(head.embed(next_token.to(device)))
        finally:
            batched.leave()

    async def all_sessions():
        return await asyncio.gather(*(one(prompts[i : i + 1]) for i in range(prompts.shape[0])))

    return torch.cat(client.run(all_sessions()), dim=0)


# --- measuring ---------------------------------------------------------------------------------------


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def alternate(node_fn, local_fn, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Warm both up, then alternate node and local runs; returns the seconds of each run."""
    for _ in range(warmup):
        node_fn()
        local_fn()
    node_s, local_s = [], []
    for _ in range(repeats):
        node_s.append(timed(node_fn))
        local_s.append(timed(local_fn))
    return node_s, local_s


class LocalMemoryProbe:
    """Peak PSS of a fresh process that holds the model in plain transformers and runs the same work once.

    It starts (imports) while the node is still stopping and loads the model once told to, so that
    the node's processes no longer share its pages."""

    def __init__(self, model_path: str, dtype: str, device: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.tools.local_memory", model_path, dtype, device, str(BATCH), str(LENGTH)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
        )

    def result(self, timeout: float) -> int:
        try:
            out, err = self.proc.communicate("go\n", timeout=timeout)
        finally:
            self.cancel()
        if self.proc.returncode != 0:
            raise RuntimeError(f"the local memory probe failed ({self.proc.returncode}):\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])["pss"]

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def metric(unit: str, node: float, local: float, higher_is_better: bool, label: str) -> dict:
    ratio = node / local if higher_is_better else local / node
    return {
        "label": label,
        "unit": unit,
        "node": node,
        "local": local,
        "ratio": ratio,
        "ratio_is": "node/local" if higher_is_better else "local/node",
    }


def format_table(metrics: dict) -> str:
    rows = [("metric", "unit", "node", "local", "ratio")]
    for m in metrics.values():
        rows.append((m["label"], m["unit"], _num(m["node"]), _num(m["local"]), f"{m['ratio']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}"


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m node.bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a local model directory (a Llama-family checkpoint) instead of a preset")
    src.add_argument(
        "--preset",
        choices=["micro", "tiny", "small", "8b"],
        default="tiny",
        help="random Llama made here with seed 0 (default tiny)",
    )
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generation (default 32)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--quant_type",
        choices=["none", "int8", "nf4"],
        default="none",
        help="the node's weight quantization (default none: the local baseline is unquantized transformers)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed forward and backward calls per side (default 10)")
    p.add_argument("--gen_repeats", type=int, default=3, help="timed generations per side (default 3)")
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions for the aggregate row (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per side before each measurement (default 2)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE")
    p.add_argument("--dht_prefix", default="bench-llama")
    p.add_argument("--max_seconds", type=float, default=900, help="give up (and stop the node) after this long")
    p.add_argument("--keep", action="store_true", help="keep the work directory (model, run dir, node log)")
    args = p.parse_args(argv)
    for name in ("tokens", "repeats", "gen_repeats", "sessions"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    def on_alarm(signum, frame):
        raise BenchTimeout(f"the benchmark ran past --max_seconds {args.max_seconds:.0f}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.max_seconds)
    bench_began = time.monotonic()

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="node-bench-"))
    finished = False
    try:
        finished = run(args, work, dtype, device, bench_began)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        elif finished:
            shutil.rmtree(work, ignore_errors=True)
        else:  # keep the node's log for a look, not the weights
            for entry in work.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
            print(f"the node's log is kept in {work}", file=sys.stderr)
    return 0


def run(args, work: Path, dtype: torch.dtype, device: torch.device, bench_began: float) -> bool:
    from transformers import AutoConfig, AutoModelForCausalLM

    from node.client.generate import LocalHead
    from node.client.swarm import Client
    from node.tools.tinymodel import make_preset

    model_path = args.model
    if model_path is None:
        model_path = str(work / f"{args.preset}-llama")
        make_preset(model_path, args.preset, seed=0)
    config = AutoConfig.from_pretrained(model_path)
    num_blocks = config.num_hidden_layers
    shape = (
        f"hidden {config.hidden_size}, {num_blocks} blocks, {config.num_attention_heads} heads, "
        f"{getattr(config, 'num_key_value_heads', config.num_attention_heads)} KV heads, "
        f"intermediate {config.intermediate_size}, vocab {config.vocab_size}"
    )
    source = args.model or f"preset {args.preset} (random, seed 0)"
    print(f"model: {source}: {config.model_type}, {shape}")
    print(
        f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {platform.machine()}, "
        f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()} "
        f"(interop {torch.get_num_interop_threads()}), dtype {args.dtype}, quant_type {args.quant_type}, "
        f"device {args.device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    load_before = os.getloadavg()
    print(
        f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
        "(the client, the node and the local baseline share these cores; other load makes the figures noisy)"
    )

    node = NodeProcess(
        model_path,
        work / "run",
        "--torch_dtype",
        args.dtype,
        "--device",
        args.device,
        "--quant_type",
        args.quant_type,
        "--num_handlers",
        "1",
        "--metrics_port",
        "0",  # a free one, named in status.json
        dht_prefix=args.dht_prefix,
        log_path=work / "node.log",
    )
    sampler: Optional[PssSampler] = None
    client = None
    memory_probe: Optional[LocalMemoryProbe] = None
    samples: dict = {}
    checks: dict = {}
    timing: dict = {}
    ok = False
    try:
        print("starting the node ...", flush=True)
        began = time.monotonic()
        node.start(timeout=min(180.0, args.max_seconds))
        cold_start = time.monotonic() - began
        sampler = PssSampler(node.all_pids).start()
        print(
            f"node ONLINE after {cold_start:.2f} s: blocks {node.status.get('blocks')}, "
            f"{len(node.all_pids())} processes",
            flush=True,
        )

        began = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        sync(device)
        local_load = time.monotonic() - began
        model.requires_grad_(False)
        head = LocalHead(model_path, dtype=dtype)
        head.model.to(device)
        client = Client(node.maddrs, args.dht_prefix)
        route = client.route(0, num_blocks)
        if len(route) != 1:
            raise RuntimeError(f"expected the node alone to serve all blocks, got the route {route}")
        span = route[0]

        # 1. generation, one session, batch 1
        prompt = torch.tensor([[t % config.vocab_size for t in PROMPT]])
        n = args.tokens
        print(
            f"generation: {n} new tokens after a {prompt.shape[1]}-token prompt, {args.gen_repeats} runs per side ...",
            flush=True,
        )
        outputs = {}

        def node_gen(k=n, record=None):
            outputs["node"] = node_generate(
                client, head, route, prompt, k, device, record if record is not None else {}
            )

        def local_gen(k=n):
            outputs["local"] = local_generate(model, prompt.to(device), k).cpu()

        for _ in range(args.warmup):
            node_gen()
            local_gen()
        node_s, local_s = alternate(lambda: node_gen(record=timing), local_gen, args.gen_repeats, 0)
        samples["generate_s"] = {"node": node_s, "local": local_s}
        checks["generated_tokens_match"] = outputs["node"].tolist() == outputs["local"].tolist()

        # 1a. the fixed cost of a step: the node's time for it against its compute, and the client's
        print(f"fixed cost of a step: {STEP_COST_STEPS} one-token steps of one session ...", flush=True)
        step_cost = measure_step_cost(client, route, config.hidden_size, node.status["metrics_port"])

        # 1b. generation, several concurrent sessions, against the same sequences batched locally
        k = args.sessions
        prompts = torch.stack([torch.tensor([(t * (i + 3) + i) % config.vocab_size for t in PROMPT]) for i in range(k)])
        print(f"generation: {k} concurrent sessions x {n} new tokens, {args.gen_repeats} runs per side ...", flush=True)
        many = {}
        node_s, local_s = alternate(
            lambda: many.__setitem__("node", node_generate_concurrently(client, head, route, prompts, n, device)),
            lambda: many.__setitem__("local", local_generate(model, prompts.to(device), n).cpu()),
            args.gen_repeats,
            args.warmup,
        )
        samples["generate_many_s"] = {"node": node_s, "local": local_s}
        checks["concurrent_tokens_match"] = many["node"].tolist() == many["local"].tolist()

        # 2. forward, 4 x 128 tokens of hidden states
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(BATCH, LENGTH, config.hidden_size, generator=g).to(dtype)
        grad_outputs = (torch.randn(BATCH, LENGTH, config.hidden_size, generator=g) * 0.01).to(dtype)
        hidden_dev, grad_dev = hidden.to(device), grad_outputs.to(device)
        print(f"forward: {BATCH} x {LENGTH} tokens, {args.repeats} calls per side ...", flush=True)
        fwd = {}
        node_s, local_s = alternate(
            lambda: fwd.__setitem__("node", client.forward_span(span, hidden)),
            lambda: fwd.__setitem__("local", local_forward(model, hidden_dev)),
            args.repeats,
            args.warmup,
        )
        samples["forward_s"] = {"node": node_s, "local": local_s}
        checks["forward_max_rel_err"] = _rel_err(fwd["node"], fwd["local"].cpu())

        # 3. backward, the same 4 x 128
        print(f"backward: {BATCH} x {LENGTH} tokens, {args.repeats} calls per side ...", flush=True)
        bwd = {}
        node_s, local_s = alternate(
            lambda: bwd.__setitem__("node", client.backward_span(span, hidden, grad_outputs)[0]),
            lambda: bwd.__setitem__("local", local_backward(model, hidden_dev, grad_dev)),
            args.repeats,
            args.warmup,
        )
        samples["backward_s"] = {"node": node_s, "local": local_s}
        checks["backward_max_rel_err"] = _rel_err(bwd["node"], bwd["local"].cpu())
        sampler.sample()

        # 4. a session surviving its runtime (last: the node is JOINING while the runtime restarts)
        print(f"session recovery: a {RECOVERY_TOKENS}-token session, its runtime killed with -9 ...", flush=True)
        recovery, rebuilt, expected = measure_session_recovery(
            node, client, span, model, local_layers_forward, dtype, device
        )
        checks["recovery_rel_err"] = _rel_err(rebuilt, expected)
        ok = True
        print("measuring the memory of plain transformers in a fresh process (while the node stops) ...", flush=True)
        memory_probe = LocalMemoryProbe(model_path, args.dtype, args.device)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # stopping the node has its own time limits
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
        if sampler is not None:
            sampler.stop()
        try:
            code = node.stop()
        except BaseException:
            if memory_probe is not None:
                memory_probe.cancel()
            raise
        if not ok:
            print(f"node stopped (exit code {code}); its log: {node.log_path}", file=sys.stderr)
            if node.log_tail(20):
                print(node.log_tail(20), file=sys.stderr)

    local_pss = memory_probe.result(timeout=max(30.0, args.max_seconds - (time.monotonic() - bench_began)))
    print("measuring this machine's bound (torch alone, nothing else running) ...", flush=True)
    layers = list(model.model.layers.parameters())
    machine = machine_bound.measure(dtype, device)
    bound = machine_bound.bounds(
        machine,
        sum(p.numel() for p in layers),
        sum(p.numel() * p.element_size() for p in layers),
        config,
        BATCH,
        LENGTH,
    )
    print("measuring the transport floor (the same bytes between two bare p2pd daemons) ...", flush=True)
    calls = max(1, min(args.repeats, 5))
    transport = {
        "forward_s": median(bare_rpc.transfer_round_trips([hidden], hidden, calls)),
        "backward_s": median(bare_rpc.transfer_round_trips([hidden, grad_outputs], hidden, calls)),
    }

    gen, fwd_s, bwd_s = samples["generate_s"], samples["forward_s"], samples["backward_s"]
    tokens_fb = BATCH * LENGTH
    metrics = {
        "cold_start": metric("s", cold_start, local_load, False, "cold start: node to ONLINE / local from_pretrained"),
        "generation": metric(
            "tokens/s",
            n / median(gen["node"]),
            n / median(gen["local"]),
            True,
            f"generation, 1 session, batch 1, {n} tokens",
        ),
        "concurrent": metric(
            "tokens/s",
            k * n / median(samples["generate_many_s"]["node"]),
            k * n / median(samples["generate_many_s"]["local"]),
            True,
            f"generation, {k} sessions (local: batch {k}), {n} tokens each",
        ),
        "forward": metric(
            "tokens/s",
            tokens_fb / median(fwd_s["node"]),
            tokens_fb / median(fwd_s["local"]),
            True,
            f"forward {BATCH}x{LENGTH}, all blocks",
        ),
        "backward": metric(
            "ms",
            1000 * median(bwd_s["node"]),
            1000 * median(bwd_s["local"]),
            False,
            f"backward {BATCH}x{LENGTH}, all blocks (per call)",
        ),
        "session_recovery": metric(
            "s",
            recovery["rebuild_s"],
            recovery["local_s"],
            False,
            f"session of {RECOVERY_TOKENS} tokens rebuilt + 1 step (local: {RECOVERY_TOKENS + 1}-token prefill)",
        ),
        "step": metric(
            "ms",
            1000 * step_cost["client_s"],
            1000 * (step_cost["compute_s"] + step_cost["bare_rpc_s"]),
            False,
            "1-token step seen by the client (local: its compute + a bare p2pd RPC)",
        ),
        "peak_pss": metric("MiB", sampler.peak / MIB, local_pss / MIB, False, "peak memory, PSS (node: all processes)"),
    }
    per_token = {
        "client_head_ms": 1000 * median(timing["head_s"]),
        "node_step_round_trip_ms": 1000 * median(timing["step_s"]) if timing.get("step_s") else 0.0,
        "prefill_round_trip_ms": 1000 * median(timing["prefill_s"]),
    }

    print()
    print(format_table(metrics))
    print(
        "ratio: node/local for tokens/s, local/node for seconds, ms and MiB; "
        "higher is better for the node, 1.0 = parity"
    )
    print(
        f"per generated token through the node (medians): client embed+norm+head {per_token['client_head_ms']:.2f} ms, "
        f"session.step round trip {per_token['node_step_round_trip_ms']:.2f} ms "
        f"(prefill step {per_token['prefill_round_trip_ms']:.2f} ms)"
    )
    print(
        f"fixed cost of a step (means of {STEP_COST_STEPS} one-token steps): in the node, from the client's "
        f"message read to the reply written, {1000 * step_cost['in_node_s']:.3f} ms, of which the blocks' "
        f"compute {1000 * step_cost['compute_s']:.3f} ms: the node adds {1000 * step_cost['fixed_s']:.3f} ms; "
        f"the client saw {1000 * step_cost['client_s']:.3f} ms (median {1000 * step_cost['client_median_s']:.3f}) "
        f"= compute + a bare RPC between two p2pd daemons ({1000 * step_cost['bare_rpc_s']:.3f} ms, median "
        f"{1000 * step_cost['bare_rpc_median_s']:.3f}) + {1000 * step_cost['client_excess_s']:.3f} ms"
    )
    print(
        f"checks: generated tokens match transformers: {checks['generated_tokens_match']} "
        f"(concurrent sessions: {checks['concurrent_tokens_match']}); "
        f"max rel err forward {checks['forward_max_rel_err']:.2e}, backward {checks['backward_max_rel_err']:.2e}"
    )
    print(
        f"session recovery: the runtime was ready again {recovery['restart_s']:.2f} s after kill -9 "
        f"(node cold start {cold_start:.2f} s); the session's next step, its {RECOVERY_TOKENS}-token cache rebuilt "
        f"first, took {recovery['rebuild_s']:.2f} s (max rel err {checks['recovery_rel_err']:.2e})"
    )
    forward_node, forward_local = metrics["forward"]["node"], metrics["forward"]["local"]
    print(
        f"this machine's bound ({args.dtype}, torch alone): memory {machine['memory_gb_s']:.1f} GB/s, matrix "
        f"products {machine['matmul_gflop_s']:.0f} GFLOP/s; so a decode step of these blocks takes at least "
        f"{bound['decode_step_ms']:.1f} ms and a {BATCH}x{LENGTH} forward {bound['forward_s']:.2f} s "
        f"({bound['forward_tokens_s']:.1f} tokens/s): the node's forward at "
        f"{forward_node / bound['forward_tokens_s']:.0%} of it, transformers' at "
        f"{forward_local / bound['forward_tokens_s']:.0%}"
    )
    forward_floor = median(fwd_s["local"]) + transport["forward_s"]
    backward_floor = median(bwd_s["local"]) + transport["backward_s"]
    print(
        f"the transport floor (the same bytes sent and returned between two bare p2pd daemons, serialized and in "
        f"parts as a Petals client sends them, nothing computed): forward {1000 * transport['forward_s']:.1f} ms, "
        f"backward {1000 * transport['backward_s']:.1f} ms; transformers' layers plus it against the node: forward "
        f"{forward_floor / median(fwd_s['node']):.3f}, backward {backward_floor / median(bwd_s['node']):.3f}"
    )
    load_after = os.getloadavg()
    print(
        f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
        f"total {time.monotonic() - bench_began:.1f} s"
    )

    if args.json:
        report = {
            "model": {
                "source": source,
                "model_type": config.model_type,
                "hidden_size": config.hidden_size,
                "num_blocks": num_blocks,
                "num_heads": config.num_attention_heads,
                "num_kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
                "intermediate_size": config.intermediate_size,
                "vocab_size": config.vocab_size,
            },
            "machine": {
                "cpu_count": os.cpu_count(),
                "usable_cpus": len(os.sched_getaffinity(0)),
                "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "loadavg_before": list(load_before),
                "loadavg_after": list(load_after),
            },
            "settings": {
                "dtype": args.dtype,
                "device": args.device,
                "quant_type": args.quant_type,
                "tokens": n,
                "prompt_tokens": len(PROMPT),
                "forward_shape": [BATCH, LENGTH],
                "repeats": args.repeats,
                "gen_repeats": args.gen_repeats,
                "sessions": args.sessions,
                "warmup": args.warmup,
                "num_handlers": 1,
            },
            "metrics": metrics,
            "bound": dict(machine, **bound, forward_fraction=forward_node / bound["forward_tokens_s"]),
            "per_token": per_token,
            "step_cost": step_cost,
            "transport": transport,
            "recovery": recovery,
            "checks": checks,
            "samples": samples,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return True


def step_counters(port: int) -> tuple[float, float, float]:
    """(steps timed, their seconds in the node, their compute seconds) from the node's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    return tuple(
        sum(sample.value for sample in families[name].samples if sample.name.endswith("_total"))
        if name in families
        else 0.0
        for name in ("node_steps_timed", "node_step_seconds", "node_step_compute_seconds")
    )


def settled_counters(port: int, at_least: float = 0.0, timeout: float = 30.0) -> tuple[float, float, float]:
    """The counters once they hold `at_least` steps and have stopped moving: the keeper publishes its
    figures with its heartbeat (about once a second), so the last steps show a moment later."""
    deadline = time.monotonic() + timeout
    last = step_counters(port)
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = step_counters(port)
        if now == last and now[0] >= at_least:
            return now
        last = now
    raise RuntimeError(f"the node's step counters did not reach {at_least:.0f} steps in {timeout:.0f} s: {last}")


def measure_step_cost(client, route, hidden_size: int, metrics_port: int) -> dict:
    """One session of one-token steps (hidden states straight in: no embeddings, no head), timed by the
    client, against the node's own account of them (the keeper's time from a message read to its reply
    written, and the runtime's compute inside) and a bare echo RPC between two fresh p2pd daemons."""
    g = torch.Generator().manual_seed(2)
    steps, warmup = STEP_COST_STEPS, STEP_COST_WARMUP
    times = []
    span = route[0]
    with client.session(max_length=steps + warmup, start=span.start, end=span.end, route=route) as session:
        for _ in range(warmup):
            session.step(torch.randn(1, 1, hidden_size, generator=g))
        before = settled_counters(metrics_port)
        for _ in range(steps):
            hidden = torch.randn(1, 1, hidden_size, generator=g)
            began = time.perf_counter()
            session.step(hidden)
            times.append(time.perf_counter() - began)
    after = settled_counters(metrics_port, at_least=before[0] + steps)
    counted = after[0] - before[0]
    if counted != steps:
        raise RuntimeError(f"the node timed {counted:.0f} steps, the client sent {steps}")
    in_node, compute = (after[1] - before[1]) / steps, (after[2] - before[2]) / steps
    bare = bare_rpc.echo_round_trips(hidden_size, steps, warmup)
    client_s, bare_s = statistics.mean(times), statistics.mean(bare)
    return {
        "steps": steps,
        "in_node_s": in_node,
        "compute_s": compute,
        "fixed_s": in_node - compute,
        "client_s": client_s,
        "client_median_s": median(times),
        "bare_rpc_s": bare_s,
        "bare_rpc_median_s": median(bare),
        "client_excess_s": client_s - compute - bare_s,
    }


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchTimeout as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
