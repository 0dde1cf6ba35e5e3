"""`python -m node.demo`: the node's main job on a built-in default, end to end.

Makes a tiny random Llama (fixed seed), starts a node serving all of its blocks in a private swarm
on loopback, generates a few tokens through the node with the project's client, checks them against
plain transformers on this machine, and stops the node.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="serve this local model directory instead of the built-in tiny one")
    parser.add_argument("--dht_prefix", default="tiny-llama")
    parser.add_argument("--tokens", type=int, default=16, help="how many tokens to generate")
    parser.add_argument("--num_handlers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (model, run dir, node log)")
    args = parser.parse_args(argv)

    from node.client.generate import LocalHead, greedy_generate
    from node.client.swarm import Client
    from node.tools.launcher import NodeProcess
    from node.tools.tinymodel import make_preset

    work = Path(tempfile.mkdtemp(prefix="node-demo-"))
    model = args.model
    if model is None:
        model = str(work / "tiny-llama")
        make_preset(model, "tiny")
        print(f"made a tiny random Llama (hidden 256, 8 blocks, seed 0) in {model}")

    node = NodeProcess(
        model,
        work / "run",
        "--num_handlers",
        str(args.num_handlers),
        dht_prefix=args.dht_prefix,
        log_path=work / "node.log",
    )
    began = time.monotonic()
    print("starting the node (python -m node.supervisor ...) in a private swarm on loopback ...")
    ok = False
    try:
        node.start()
        print(
            f"node ONLINE after {time.monotonic() - began:.1f} s: peer {node.peer_id}, blocks {node.status['blocks']}"
        )
        head = LocalHead(model)
        prompt = torch.tensor([[1, 15, 27, 99, 4, 63]])
        with Client(node.maddrs, args.dht_prefix) as client:
            began = time.monotonic()
            tokens = greedy_generate(client, head, prompt, args.tokens)
            seconds = time.monotonic() - began
        print(
            f"generated through the node: {tokens[0, prompt.shape[1] :].tolist()} "
            f"({args.tokens / seconds:.1f} tokens/s)"
        )

        from transformers import AutoModelForCausalLM

        local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        reference = local.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens, do_sample=False, pad_token_id=0
        )
        ok = tokens.tolist() == reference.tolist()
        print(f"plain transformers locally:  {reference[0, prompt.shape[1] :].tolist()}")
        print("MATCH: the node generated exactly what transformers generates" if ok else "MISMATCH")
    finally:
        code = node.stop()
        print(f"node stopped (exit code {code}); its log: {node.log_path}")
        if not args.keep and ok:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
