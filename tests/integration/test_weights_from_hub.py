"""Weights from the hub (PROTOCOL 5.11), with the real huggingface_hub code against a local HTTP server
that speaks the part of the hub's API that downloads use, serving repositories made here.

The server answers HEAD/GET /{repo}/resolve/{revision}/{file} as huggingface.co does: small files
directly (ETag = git blob sha1), safetensors files (LFS) with a 302 to a "CDN" path and their sha256 in
X-Linked-Etag / X-Linked-Size; errors carry X-Error-Code as the hub's do. It records every request, and
can cut a download short, slow it down, or hold it half-way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import torch

from node.tools.launcher import NodeProcess
from tests.helpers.fake_hub import INDEX, shards_of
from tests.helpers.paths import ROOT
from tests.helpers.reference import hf_blocks, rel_err


def test_node_serves_blocks_from_the_hub(hub, models, tmp_path):
    from transformers import AutoModelForCausalLM

    from node.client.swarm import Client

    node = NodeProcess(
        "org/sharded",
        tmp_path / "node",
        "--block_indices",
        "1:3",
        "--cache_dir",
        str(tmp_path / "cache"),
        dht_prefix="tiny-hub",
        env={"HF_ENDPOINT": hub.url},
    )
    with node:
        needed = shards_of(models["sharded"], [1, 2])
        assert hub.gets() == Counter({"config.json": 1, INDEX: 1, **{f: 1 for f in needed}})
        client = Client(node.maddrs, "tiny-hub")
        try:
            torch.manual_seed(0)
            hidden = torch.randn(2, 5, 64)
            out = client.forward(hidden, 1, 3)
        finally:
            client.close()
    model = AutoModelForCausalLM.from_pretrained(str(models["sharded"]), dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(out, hf_blocks(model, hidden, 1, 3)) <= 1e-5


def test_node_exits_2_naming_the_flag_when_the_hub_refuses(hub, tmp_path):
    hub.token = "secret"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.supervisor",
            "--model",
            "org/sharded",
            "--token",
            "wrong",
            "--new_swarm",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--run_dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env={**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--token" in result.stderr and "HTTP 401" in result.stderr
    assert len(hub.log) == 1
